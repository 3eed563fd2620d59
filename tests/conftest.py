"""Fixtures and helpers shared by the whole suite.

A real mosquitto broker and its clients, dataflow runners, the real ``curl`` and
``coap-client`` binaries, device registries, Parquet output readers and loopback
port helpers. Test modules import the plain helpers with
``from tests.conftest import ...``; the fixtures are found by pytest.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import bytewax.operators as op
import duckdb
import pytest
from bytewax.dataflow import Dataflow, Stream
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import cluster_main, run_main

from connectors.devices.embedded import EmbeddedBroker
from connectors.devices.mosquitto import Mosquitto
from connectors.devices.registry import Device, DeviceRegistry
from operators.records import RawMessage, Reading, series_key

if TYPE_CHECKING:
    from connectors.devices.embedded import EmbeddedBroker

ROOT = Path(__file__).resolve().parents[1]
"""The repository root."""

PUB_TIMEOUT_S = 15.0
CURL_TIMEOUT_S = 10.0
COAP_CLIENT_TIMEOUT_S = 15.0

TOKEN_1 = "tok-pump-1-Zq8xW3vK"
"""The access token of ``pump-1`` in :func:`device_registry`'s default registry."""
TOKEN_2 = "tok-fan-2-Hh4tLr9P"
"""The access token of ``fan-2`` in :func:`device_registry`'s default registry."""
DEVICES = {"pump-1": TOKEN_1, "fan-2": TOKEN_2}


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


def require_tool(*names: str, package: str, tests: str) -> str:
    """The path of the first of ``names`` on PATH; skip (locally) or fail (CI set) without one.

    ``package`` is what to ``apt-get install``; ``tests`` names the tests that need it.
    """
    for name in names:
        found = shutil.which(name)
        if found is not None:
            return found
    reason = f"{' or '.join(names)} is not installed (apt-get install {package})"
    if os.environ.get("CI") is not None:
        pytest.fail(f"{reason}; CI is set, so the {tests} tests must run", pytrace=False)
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


def run_dataflow(flow: Dataflow, *, workers: int = 1) -> None:
    """Run ``flow`` to its end: ``run_main`` for one worker, ``cluster_main`` for more."""
    if workers == 1:
        run_main(flow)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=workers)


def run_with_recovery(make_flow: Callable[[], Dataflow], recovery_dir: Path, runs: int = 2) -> None:
    """Run ``make_flow()`` ``runs`` times against one recovery store, snapshotting every epoch.

    The source of the first run should hold a ``TestingSource.ABORT()``: the next run
    resumes from the last snapshot.
    """
    init_db_dir(recovery_dir, 1)
    for _ in range(runs):
        run_main(
            make_flow(),
            epoch_interval=timedelta(0),
            recovery_config=RecoveryConfig(str(recovery_dir)),
        )


def note_workers(step_id: str, stream: Stream[Any], seen: set[int] | None) -> None:
    """Add the index of every worker that sees an item of ``stream`` to ``seen`` (if given)."""
    if seen is not None:
        op.inspect_debug(step_id, stream, lambda _s, _i, _e, worker: seen.add(worker))


READING_T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def reading(device: str, seconds: float, value: float | str, key: str = "temp") -> Reading:
    """A reading ``seconds`` after :data:`READING_T0`."""
    return Reading(device, key, READING_T0 + timedelta(seconds=seconds), value)


def keyed(readings: Iterable[Reading]) -> list[tuple[str, Reading]]:
    """``readings`` keyed by their series, as the operators take them."""
    return [(series_key(r.device, r.key), r) for r in readings]


class FlowThread:
    """A Bytewax dataflow running in a background thread (``run_main`` or ``cluster_main``)."""

    def __init__(self, flow: Dataflow, *, workers: int = 1) -> None:
        self.flow = flow
        self.workers = workers
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"flow-{flow.flow_id}", daemon=True)

    def _run(self) -> None:
        try:
            run_dataflow(self.flow, workers=self.workers)
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
    from connectors.devices.embedded import EmbeddedBroker  # amqtt is an optional extra

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


# --- files -------------------------------------------------------------------------------------


def write_file(directory: Path, name: str, content: str | bytes) -> Path:
    """Write ``content`` (str as UTF-8, bytes as they are) to ``directory / name``."""
    path = directory / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def write_devices(directory: Path, devices: str | bytes | Mapping[str, str]) -> Path:
    """Write ``directory/devices.yaml``: given text as is, or a ``{id: token}`` mapping."""
    if isinstance(devices, Mapping):
        devices = "devices:\n" + "".join(
            f"  - {{id: {json.dumps(id_)}, token: {json.dumps(token)}}}\n"
            for id_, token in devices.items()
        )
    return write_file(directory, "devices.yaml", devices)


def device_registry(devices: Mapping[str, str] = DEVICES) -> DeviceRegistry:
    """A registry of ``{id: token}``; by default ``pump-1`` (:data:`TOKEN_1`), ``fan-2``."""
    return DeviceRegistry(Device(id_, token) for id_, token in devices.items())


def query_parquet(data_dir: Path, stream: str, sql: str) -> list[tuple]:
    """Run ``sql`` over the Parquet files of ``stream`` under ``data_dir/parquet``.

    ``{src}`` in ``sql`` stands for the (hive-partitioned) files; no files give ``[]``.
    """
    folder = data_dir / "parquet" / stream
    if not list(folder.glob("**/*.parquet")):
        return []
    src = f"read_parquet('{folder / '**' / '*.parquet'}', hive_partitioning=true)"
    return duckdb.sql(sql.format(src=src)).fetchall()


def printed(exc: BaseException) -> str:
    """Everything a crash would print: the message, the chain and the traceback."""
    return "".join(traceback.format_exception(exc))


def assert_not_printed(exc: BaseException, *secrets: str) -> None:
    """None of ``secrets`` shows anywhere in what ``exc`` would print."""
    shown = printed(exc)
    for secret in secrets:
        assert secret not in shown, shown


def raw_message(
    channel: str,
    payload: bytes | str,
    received_at: datetime,
    *,
    device: str = "pump-7",
    transport: str = "mqtt",
) -> RawMessage:
    """A device message as the transports hand it to the codecs (str payloads as UTF-8)."""
    if isinstance(payload, str):
        payload = payload.encode()
    return RawMessage(device, channel, transport, received_at, payload)


def assert_reason_shape(reason: str, channel: str) -> None:
    """A dead-letter reason: one line of at most 200 characters naming its channel first."""
    assert reason.startswith(f"{channel}: "), reason
    assert len(reason.splitlines()) == 1, reason
    assert len(reason) <= 200, reason


def ms(ts: datetime) -> int:
    """Unix milliseconds of ``ts``."""
    return int(ts.timestamp() * 1000)


# --- loopback ports ----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def refused(port: int) -> bool:
    """Whether a TCP connection to 127.0.0.1:``port`` is refused (nothing listens)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A TCP port on 127.0.0.1 held by a listening socket for the whole test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def ipv6_loopback() -> bool:
    """Whether this machine can bind ``::1``."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def port_when_listening(server: Any, what: str = "the server to listen") -> int:
    """Wait until ``server.port`` stops raising ``RuntimeError`` (not started yet); return it."""

    def port() -> int | None:
        try:
            return server.port
        except RuntimeError:
            return None

    return wait_for(port, what)


# --- curl --------------------------------------------------------------------------------------


def require_curl() -> str:
    """Skip (locally) or fail (CI set) without the curl binary."""
    return require_tool("curl", package="curl", tests="HTTP")



@pytest.fixture(autouse=True)
def _root_logging() -> Iterator[None]:
    """Give back the root logger's handlers and level (and the access log's) after each test.

    ``edgesieve run``/``demo`` called in-process (``flows.cli.main``) set up
    the console and log files on the root logger; without this, their handlers
    would outlive the test and write its later lines into a closed capture.
    """
    from flows import console

    root = logging.getLogger()
    access = logging.getLogger(console.ACCESS_LOGGER)
    handlers, level, access_level = list(root.handlers), root.level, access.level
    yield
    access.setLevel(access_level)
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
    console._current = None

@dataclass
class HttpReply:
    """The final response curl received."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    """Lower-case header names."""
    body: bytes = b""

    @property
    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)

    @property
    def error(self) -> str:
        """The text of an ``{"error": ...}`` body (asserting that is all the body holds)."""
        doc = self.json
        assert set(doc) == {"error"}, doc
        return doc["error"]


def curl(
    url: str,
    data: bytes | None = None,
    *,
    method: str | None = None,
    headers: tuple[str, ...] = (),
    args: tuple[str, ...] = (),
) -> HttpReply:
    """One request with the real curl binary (``data`` goes through stdin).

    Raises ``RuntimeError`` naming curl's exit code when the request fails
    (``exit 7``: connection refused).
    """
    require_curl()
    with tempfile.TemporaryDirectory() as tmp:
        head, body = Path(tmp, "head"), Path(tmp, "body")
        cmd = ["curl", "-sS", "-g", "--max-time", str(CURL_TIMEOUT_S), "-D", str(head)]
        cmd += ["-o", str(body), "-w", "%{http_code}"]
        if data is not None:
            cmd += ["--data-binary", "@-"]
        if method is not None:
            cmd += ["-X", method]
        for header in headers:
            cmd += ["-H", header]
        cmd += [*args, url]
        proc = subprocess.run(
            cmd, input=data, capture_output=True, timeout=CURL_TIMEOUT_S + 5, check=False
        )
        if proc.returncode != 0:
            msg = f"curl {url} failed (exit {proc.returncode}): {proc.stderr.decode().strip()}"
            raise RuntimeError(msg)
        blocks = head.read_bytes().decode("latin-1").strip().split("\r\n\r\n")
        final = blocks[-1].split("\r\n")[1:]  # after any "100 Continue"
        parsed = dict(line.split(": ", 1) for line in final)
        return HttpReply(
            int(proc.stdout),
            {k.lower(): v for k, v in parsed.items()},
            body.read_bytes() if body.exists() else b"",
        )


# --- libcoap's coap-client ---------------------------------------------------------------------

COAP_RESPONSE_LINE = re.compile(r"^v:1 t:(?:CON|NON|ACK) c:(\d\.\d\d) .*$", re.MULTILINE)


def require_coap_client() -> str:
    """The path of libcoap's coap-client; skip (locally) or fail (CI set) without it."""
    return require_tool("coap-client", "coap-client-notls", package="libcoap3-bin", tests="CoAP")


@dataclass
class CoapReply:
    """What coap-client got back: the final response code, its dump line, its diagnostic."""

    code: str
    line: str
    diagnostic: str
    codes: list[str]
    """Every response code, block-wise continuations (``2.31``) included."""


def coap_client(
    url: str,
    *,
    method: str = "post",
    text: str | None = None,
    file: Path | None = None,
    block: int | None = None,
    non: bool = False,
    content_format: str | None = None,
) -> CoapReply:
    """Run the real coap-client once (bounded by -B and a subprocess timeout)."""
    cmd = [require_coap_client(), "-v", "7", "-B", "5", "-m", method]
    if non:
        cmd.append("-N")
    if content_format is not None:
        cmd += ["-t", content_format]
    if text is not None:
        cmd += ["-e", text]
    if file is not None:
        cmd += ["-f", str(file)]
    if block is not None:
        cmd += ["-b", str(block)]
    cmd.append(url)
    proc = subprocess.run(cmd, capture_output=True, timeout=COAP_CLIENT_TIMEOUT_S, check=False)
    out = proc.stdout.decode(errors="replace")
    lines = [m.group(0) for m in COAP_RESPONSE_LINE.finditer(out)]
    codes = [m.group(1) for m in COAP_RESPONSE_LINE.finditer(out)]
    if not codes:
        pytest.fail(f"coap-client got no response from {url}: {proc.stderr.decode()[-500:]}")
    err = proc.stderr.decode(errors="replace").strip().splitlines()
    diagnostic = err[-1].removeprefix(codes[-1]).strip() if err else ""
    return CoapReply(codes[-1], lines[-1], diagnostic, codes)


def edge_for(
    build: Callable[[Any], None],
    config: Any,
    *,
    source: Any,
    stop: threading.Event | None = None,
    name: str = "flow",
) -> Any:
    """``build`` on a :class:`flows.api.Edge` fed by ``source`` (a transport or recorded data)."""
    from flows.api import Edge

    edge = Edge(config, name=name, stop=stop, source=source)
    build(edge)
    return edge


@pytest.fixture(scope="session")
def tb_sdk() -> Any:
    """ThingsBoard's Python SDK in its own virtualenv (created on first use): ``tests.thingsboard``."""
    from tests.thingsboard import sdk_venv

    return sdk_venv()
