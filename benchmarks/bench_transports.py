"""HTTP, CoAP and ThingsBoard-MQTT ingest: the telemetry flow versus the same server, bare drain.

For each transport the same device server (same registry, same Ingress, which
decodes every body once) answers the same list of telemetry POSTs three times:

(a) bare: the server in this process with an in-memory Ingress that a plain
    thread empties, discarding the messages (no journal, no Bytewax, nothing
    written to disk, no fsync), so the server answers at once: the target is
    our durable path against a server that keeps nothing;
(b) flow: ``Edge.run`` of ``flows.telemetry`` (in a thread) with
    ``transports.http`` / ``transports.coap`` / ``transports.mqtt_server``
    configured, as deployed: the
    flow spawns the ingest process, whose server answers 200 / 2.04 only
    after the message is committed to the journal (``journal.sync``: ``--sync``), and
    the flow reads the journal, decodes, deadbands, windows and writes
    Parquet; it is stopped with its stop event (ingest stops, the flow drains);
(c) the ingest process alone (``python -m flows.ingest_process``, same
    config): the same server answering after the journal commit, with no flow
    reading the journal. (c)/(a) is what durability costs, (b)/(c) what the
    flow running beside ingest costs.

The load generator runs in a separate (spawned) process, so it shares no GIL
with the server. HTTP: POSTs over keep-alive connections, sent and read by a
minimal HTTP/1.1 client (prepared request bytes, the answer parsed only for
its status and length) rather than aiohttp's client, which used ~100 us of
CPU per request and so paced side (a) itself; CoAP: confirmable POSTs. Both
keep a fixed number of requests in flight. MQTT (``mqtt_server``, the
ThingsBoard endpoint): each in-flight slot is one device's MQTT 3.1.1
connection (username = its token) publishing QoS 1 to
``v1/devices/me/telemetry``, one message at a time, with prepared packets;
the answer is the PUBACK. aiocoap sends one
confirmable request at a time per peer (NSTART = 1), so each concurrent CoAP
requester has its own client context, like a separate device. A warm-up batch
precedes the timed requests; latency is measured by the client from sending a
request to reading its answer. The load process's garbage collector is held
off during the timed requests (it would add its own pauses); the server
process collects before each side, so the sides start alike. Each round runs
(a), (b) and (c), each side first in turn; the ratios are given per round and
as the median.

Prints per side: accepted requests/s (503 / 5.03 answers do not count), p50 and
p99 latency, the answer counts, and the CPU used by the load process (near 100%
means the client, not the server, set the pace) and by the server process; for
(b) that is the flow process, for (b) and (c) the ingest process's CPU and its journal
figures (group commits, messages per group, submission-to-commit and
transaction latency) follow, to show where a request's time goes.
Then the ratios (b)/(a), (c)/(a) and (b)/(c) of throughput and of p99
latency, the 503 / 5.03 answers (back-pressure) with the bare queue's high
water mark, and a check that every 200 / 2.04 answer reached the bare drain,
the flow, or (c) the journal.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import multiprocessing
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from connectors.devices.coap import CoapServer
from connectors.devices.http import HttpServer
from connectors.devices.ingress import DeviceServers, Ingress
from connectors.devices.loopback import free_port
from connectors.devices.mqtt_server import MqttServer
from connectors.devices.mqtt_wire import encode_length, encode_string
from connectors.devices.reader_priority import PRIORITY
from connectors.devices.registry import Device, DeviceRegistry
from flows import telemetry
from flows.accounting import RECEIVED, Meter, report
from flows.api import Edge
from flows.config import EdgeConfig, parse_config
from flows.ingest import READINGS
from flows.ingest_process import journal_settings
from flows.ingest_stats import read_snapshot
from flows.simulator import telemetry_payloads
from operators.records import TELEMETRY

TRANSPORTS = ("http", "coap", "mqtt_server")
OK = {"http": "200", "coap": "2.04", "mqtt_server": "PUBACK"}
BUSY = {"http": "503", "coap": "5.03", "mqtt_server": "refused"}
"""MQTT has no refusal answer: a pushed-back message's PUBACK is withheld (it counts as late)."""
KINDS = {
    "http": "HTTP POST, keep-alive",
    "coap": "CoAP confirmable POST",
    "mqtt_server": "MQTT 3.1.1 QoS 1 PUBLISH to v1/devices/me/telemetry, one connection each",
}
REQUEST_TIMEOUT_S = 10.0
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 60.0
UNSENT = "unsent"

Request = tuple[str, bytes]
"""(device token, JSON body)."""
Timed = tuple[list[str], list[float], float, float]
"""Answers and latencies (ms) of the timed requests, wall and CPU seconds of the load process."""


# --- load generator (runs in the spawned process) --------------------------------------------


async def _drive(
    requests: list[Request],
    concurrency: int,
    deadline_s: float,
    send: Callable[[int, Request], Awaitable[str]],
) -> tuple[list[str], list[float], float]:
    """Send ``requests`` with ``concurrency`` in flight; answers, latencies (ms), seconds."""
    answers = [UNSENT] * len(requests)
    latencies = [math.nan] * len(requests)
    indices = iter(range(len(requests)))
    t0 = time.perf_counter()
    deadline = t0 + deadline_s

    async def requester(slot: int) -> None:
        for i in indices:
            if time.perf_counter() > deadline:
                return
            start = time.perf_counter()
            try:
                answer = await asyncio.wait_for(send(slot, requests[i]), REQUEST_TIMEOUT_S)
            except Exception as exc:  # a failed request is counted by kind, not raised
                answer = type(exc).__name__
            latencies[i] = (time.perf_counter() - start) * 1000.0
            answers[i] = answer

    await asyncio.gather(*(requester(slot) for slot in range(concurrency)))
    return answers, latencies, time.perf_counter() - t0


async def _timed(
    requests: list[Request],
    concurrency: int,
    deadline_s: float,
    send: Callable[[int, Request], Awaitable[str]],
) -> Timed:
    """:func:`_drive` with the collector held off (bounded memory), plus the CPU seconds used."""
    gc.collect()
    gc.disable()
    cpu = time.process_time()
    try:
        answers, latencies, seconds = await _drive(requests, concurrency, deadline_s, send)
    finally:
        gc.enable()
    return answers, latencies, seconds, time.process_time() - cpu


class _OneAtATime(asyncio.Protocol):
    """A connection of the load process with one request at a time: send, await the answer.

    Subclasses parse just enough of what arrives to call :meth:`_answer`.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future[str] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport  # asyncio sets TCP_NODELAY on TCP connections

    def _answer(self, answer: str) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(answer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc or ConnectionResetError("connection closed by the server"))

    async def send(self, request: bytes) -> str:
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self._waiter


class _HttpConnection(_OneAtATime):
    """One keep-alive HTTP/1.1 connection of the load process, one request at a time.

    Sends prepared request bytes and reads the answer just far enough to
    return its status code (status line, ``Content-Length``, body), so the
    load process spends a few microseconds per request, not the ~100 of a
    full client library: the server, not the client, sets the pace.
    """

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[: end + 2]).lower()  # each header line ends with CRLF
        at = head.find(b"\r\ncontent-length:") + 17
        length = int(head[at : head.index(b"\r\n", at)]) if at >= 17 else 0
        if len(buf) < end + 4 + length:
            return
        del buf[: end + 4 + length]
        self._answer(head[9:12].decode())


async def _load_http(
    port: int, warmup: list[Request], timed: list[Request], concurrency: int, deadline_s: float
) -> tuple[list[str], Timed]:
    loop = asyncio.get_running_loop()
    connections: list[_HttpConnection | None] = [None] * concurrency
    prepared: dict[Request, bytes] = {}

    def encode(request: Request) -> bytes:
        token, body = request
        head = (
            f"POST /api/v1/{token}/telemetry HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    for request in (*warmup, *timed):  # prepared before the clock starts, for both sides
        prepared[request] = encode(request)

    async def send(slot: int, request: Request) -> str:
        connection = connections[slot]
        if connection is None or connection.transport is None:
            _, connection = await loop.create_connection(_HttpConnection, "127.0.0.1", port)
            connections[slot] = connection
        return await connection.send(prepared[request])

    try:
        warm, _, _ = await _drive(warmup, concurrency, deadline_s, send)
        return warm, await _timed(timed, concurrency, deadline_s, send)
    finally:
        for connection in connections:
            if connection is not None and connection.transport is not None:
                connection.transport.close()


async def _load_coap(
    port: int, warmup: list[Request], timed: list[Request], concurrency: int, deadline_s: float
) -> tuple[list[str], Timed]:
    import aiocoap

    contexts = []
    try:
        for _ in range(concurrency):
            contexts.append(await aiocoap.Context.create_client_context(transports=["udp6"]))

        async def send(slot: int, request: Request) -> str:
            token, body = request
            message = aiocoap.Message(
                code=aiocoap.POST,
                mtype=aiocoap.CON,
                uri=f"coap://127.0.0.1:{port}/api/v1/{token}/telemetry",
                payload=body,
            )
            response = await contexts[slot].request(message).response
            return str(response.code.dotted)

        warm, _, _ = await _drive(warmup, concurrency, deadline_s, send)
        return warm, await _timed(timed, concurrency, deadline_s, send)
    finally:
        for context in contexts:
            await context.shutdown()


class _MqttConnection(_OneAtATime):
    """One MQTT 3.1.1 connection of the load process: CONNECT, then one QoS 1 PUBLISH at a time.

    Prepared packets, and the answers parsed only for their type: like the
    HTTP client above, it spends a few microseconds per message.
    """

    def __init__(self) -> None:
        super().__init__()
        self._mid = 0

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while len(buf) >= 2:
            length, shift, at = 0, 0, 1
            while True:
                if at >= len(buf):
                    return
                byte = buf[at]
                length |= (byte & 0x7F) << shift
                shift += 7
                at += 1
                if not byte & 0x80:
                    break
            if len(buf) < at + length:
                return
            kind, body = buf[0] >> 4, bytes(buf[at : at + length])
            del buf[: at + length]
            if kind == 2:  # CONNACK
                self._answer("CONNACK" if body[1] == 0 else f"CONNACK {body[1]}")
            else:
                self._answer("PUBACK" if kind == 4 else f"packet type {kind}")

    async def connect(self, client_id: str, token: str) -> str:
        body = (
            encode_string("MQTT")
            + bytes([4, 0x80 | 0x02])  # level 4 (3.1.1); username, clean session
            + (60).to_bytes(2, "big")
            + encode_string(client_id)
            + encode_string(token)
        )
        return await self.send(bytes([0x10]) + encode_length(len(body)) + body)

    async def publish(self, payload: bytes) -> str:
        self._mid = self._mid % 0xFFFF + 1
        body = encode_string("v1/devices/me/telemetry") + self._mid.to_bytes(2, "big") + payload
        return await self.send(bytes([0x32]) + encode_length(len(body)) + body)


async def _load_mqtt(
    port: int, warmup: list[Request], timed: list[Request], concurrency: int, deadline_s: float
) -> tuple[list[str], Timed]:
    """Each slot is one device's connection (the slot's token); the bodies are sent as they come."""
    loop = asyncio.get_running_loop()
    tokens = list(dict.fromkeys(token for token, _ in (*warmup, *timed)))
    connections: list[_MqttConnection | None] = [None] * concurrency

    async def send(slot: int, request: Request) -> str:
        connection = connections[slot]
        if connection is None or connection.transport is None:
            _, connection = await loop.create_connection(_MqttConnection, "127.0.0.1", port)
            answer = await connection.connect(f"bench-{slot}", tokens[slot % len(tokens)])
            if answer != "CONNACK":
                return answer
            connections[slot] = connection
        return await connection.publish(request[1])

    try:
        warm, _, _ = await _drive(warmup, concurrency, deadline_s, send)
        return warm, await _timed(timed, concurrency, deadline_s, send)
    finally:
        for connection in connections:
            if connection is not None and connection.transport is not None:
                connection.transport.write(b"\xe0\x00")  # DISCONNECT
                connection.transport.close()


def generate_load(
    transport: str,
    port: int,
    warmup: list[Request],
    timed: list[Request],
    concurrency: int,
    deadline_s: float,
) -> tuple[list[str], Timed]:
    """Warm-up answers, then the timed requests' answers and figures."""
    load = {"http": _load_http, "coap": _load_coap, "mqtt_server": _load_mqtt}[transport]
    return asyncio.run(load(port, warmup, timed, concurrency, deadline_s))


# --- server side -----------------------------------------------------------------------------


@dataclass
class Run:
    """One side of the comparison."""

    ok: str
    """The success answer (200 / 2.04); throughput counts only these."""
    warmup: Counter[str]
    answers: Counter[str]
    latencies_ms: np.ndarray
    """Of the requests that got an answer code."""
    seconds: float
    load_cpu: float
    """CPU share of one core the load process used during the timed requests."""
    server_cpu: float
    """CPU cores' worth the server process used while the load ran (warm-up included)."""
    received: int = 0
    high_water: int = 0
    meter: Meter | None = None
    ingest_cpu: float = math.nan
    """(b): CPU cores' worth the ingest process used while the load ran."""
    journal: dict[str, Any] | None = None
    """(b): the ingest process's final journal counters (commits, commit and write latency)."""

    @property
    def rate(self) -> float:
        """Accepted requests per second: refused ones (503 / 5.03) do not count."""
        return self.answers[self.ok] / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else math.nan

    def count(self, answer: str) -> int:
        return self.warmup[answer] + self.answers[answer]


def make_server(
    transport: str, registry: DeviceRegistry, ingress: Ingress
) -> HttpServer | CoapServer | MqttServer:
    if transport == "http":
        return HttpServer("127.0.0.1:0", registry, ingress)
    if transport == "mqtt_server":
        return MqttServer("127.0.0.1:0", registry, ingress)
    return CoapServer("127.0.0.1:0", registry, ingress)


def listening_port(server: HttpServer | CoapServer | MqttServer) -> int | None:
    if isinstance(server, CoapServer | MqttServer):
        return server.port if server.running else None
    try:
        return server.port
    except RuntimeError:
        return None


def make_ingress(config: EdgeConfig) -> Ingress:
    return Ingress(
        max_messages=config.transports.queue_messages,
        max_payload_bytes=config.max_payload_bytes,
    )


def apply_load(
    transport: str,
    port: int,
    warmup: list[Request],
    timed: list[Request],
    args: argparse.Namespace,
    pool: ProcessPoolExecutor,
    ingest_pid: int | None = None,
) -> Run:
    """Run the load process against ``port`` and collect what it measured.

    ``ingest_pid``: the ingest process of side (b), whose CPU use is measured too.
    """
    gc.collect()  # both sides start from the same collector state
    ingest_cpu = process_cpu(ingest_pid)
    cpu, wall = time.process_time(), time.perf_counter()
    future = pool.submit(
        generate_load, transport, port, warmup, timed, args.concurrency, args.deadline
    )
    warm, (answers, latencies, seconds, load_cpu) = future.result(
        timeout=2 * args.deadline + REQUEST_TIMEOUT_S + 30.0
    )
    elapsed = time.perf_counter() - wall
    server_cpu = (time.process_time() - cpu) / elapsed
    ingest_cpu = (process_cpu(ingest_pid) - ingest_cpu) / elapsed
    answered = [
        ms
        for ms, a in zip(latencies, answers, strict=True)
        if a[:1].isdigit() or a in (OK[transport], BUSY[transport])
    ]
    return Run(
        OK[transport],
        Counter(warm),
        Counter(answers),
        np.array(answered),
        seconds,
        load_cpu / seconds if seconds > 0 else math.nan,
        server_cpu,
        ingest_cpu=ingest_cpu,
    )


def process_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` (Linux); NaN if unknown."""
    if pid is None:
        return math.nan
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_bare(
    transport: str,
    registry: DeviceRegistry,
    config: EdgeConfig,
    warmup: list[Request],
    timed: list[Request],
    args: argparse.Namespace,
    pool: ProcessPoolExecutor,
) -> Run:
    ingress = make_ingress(config)
    server = make_server(transport, registry, ingress)
    partition = DeviceServers(ingress, [server]).build("servers", 0, 1)
    done = threading.Event()
    drained = 0

    def drain() -> None:
        nonlocal drained
        while not done.is_set() or len(ingress):
            batch = ingress.take(args.batch)
            if batch:
                drained += len(batch)
            else:
                time.sleep(0.001)

    drainer = threading.Thread(target=drain, name="bench-bare-drain", daemon=True)
    drainer.start()
    try:
        port = listening_port(server)
        assert port is not None
        run = apply_load(transport, port, warmup, timed, args, pool)
    finally:
        partition.close()
        done.set()
        drainer.join(timeout=STOP_TIMEOUT_S)
    run.received, run.high_water = drained, ingress.high_water
    return run


def flow_settings(
    transport: str,
    registry: DeviceRegistry,
    config: EdgeConfig,
    sync: str,
    partitions: int | None = None,
) -> tuple[dict[str, Any], int]:
    """``config``'s settings with ``transport`` on a free loopback port, the registry in a file."""
    devices = config.data_dir.with_name(f"{config.data_dir.name}-devices.yaml")
    devices.parent.mkdir(parents=True, exist_ok=True)
    devices.write_text(
        "devices:\n" + "".join(f"  - {{id: {d.id}, token: {d.token}}}\n" for d in registry)
    )
    port = free_port("127.0.0.1")
    settings = {
        "data_dir": str(config.data_dir),
        "devices": str(devices),
        "transports": {transport: {"listen": f"127.0.0.1:{port}"}},
        "journal": {"sync": sync} | ({} if partitions is None else {"partitions": partitions}),
    }
    return settings, port


def run_journal_only(
    transport: str,
    registry: DeviceRegistry,
    config: EdgeConfig,
    warmup: list[Request],
    timed: list[Request],
    args: argparse.Namespace,
    pool: ProcessPoolExecutor,
) -> Run:
    """(c): the ingest process alone (``python -m flows.ingest_process``), no flow reading."""
    settings, port = flow_settings(transport, registry, config, args.sync, args.partitions)
    path = config.data_dir.with_name(f"{config.data_dir.name}-ingest.yaml")
    path.write_text(json.dumps(settings))  # JSON is YAML
    log = path.with_suffix(".log")
    with log.open("wb") as err:
        ingest = subprocess.Popen(
            [sys.executable, "-m", "flows.ingest_process", "--config", str(path)]
            + ["--channels", TELEMETRY],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while b"ingest: ready" not in log.read_bytes():
            if ingest.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-500:]
                msg = f"{transport}: the ingest process did not become ready: {tail}"
                raise RuntimeError(msg)
            time.sleep(0.01)
        run = apply_load(transport, port, warmup, timed, args, pool, ingest.pid)
    finally:
        ingest.send_signal(signal.SIGTERM)
        try:
            ingest.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            ingest.kill()
            ingest.wait()
    run.journal = journal_counters(parse_config(settings))
    run.received = run.journal["messages"] if run.journal is not None else 0
    return run


def journal_counters(config: EdgeConfig) -> dict[str, Any] | None:
    """The ingest process's final journal counters (commits, latencies, messages held)."""
    snapshot = read_snapshot(journal_settings(config).root)
    return snapshot.get("journal") if snapshot is not None else None


def run_with_flow(
    transport: str,
    registry: DeviceRegistry,
    config: EdgeConfig,
    warmup: list[Request],
    timed: list[Request],
    args: argparse.Namespace,
    pool: ProcessPoolExecutor,
) -> Run:
    settings, port = flow_settings(transport, registry, config, args.sync, args.partitions)
    config = parse_config(settings)
    stop = threading.Event()
    edge = Edge(config, name="telemetry", stop=stop)
    telemetry.build(edge)
    meter = edge.meter
    failures: list[BaseException] = []

    def target() -> None:
        try:
            edge.run()
        except BaseException as exc:
            failures.append(exc)

    flow = threading.Thread(target=target, name="bench-flow", daemon=True)
    flow.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ingest_ready(edge) and flow.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not ingest_ready(edge):
            msg = f"{transport}: the ingest process was not ready within {START_TIMEOUT_S:g}s"
            raise RuntimeError(msg)
        ingest = edge._shared.ingest  # noqa: SLF001 - the benchmark measures the spawned process
        supervisor = ingest._supervisor if ingest is not None else None  # noqa: SLF001
        pid = supervisor.pid if supervisor is not None else None
        run = apply_load(transport, port, warmup, timed, args, pool, pid)
    finally:
        stop.set()
        flow.join(timeout=STOP_TIMEOUT_S)
    if failures:
        raise failures[0]
    if flow.is_alive():
        msg = f"{transport}: the flow did not stop within {STOP_TIMEOUT_S:g}s of its stop event"
        raise RuntimeError(msg)
    run.received, run.high_water, run.meter = meter.totals[RECEIVED], 0, meter
    run.journal = journal_counters(config)
    return run


def ingest_ready(edge: Edge) -> bool:
    """Whether the flow's ingest process listens (its server started, the journal open)."""
    ingest = edge._shared.ingest  # noqa: SLF001 - the benchmark waits for the spawned server
    return ingest is not None and ingest.ready


# --- report ----------------------------------------------------------------------------------


def describe(label: str, run: Run) -> str:
    answers = ", ".join(f"{k}: {v}" for k, v in sorted(run.answers.items()))
    cpu = f"cpu load {run.load_cpu:.0%} server {run.server_cpu:.0%}"
    if run.meter is not None:
        cpu = f"cpu load {run.load_cpu:.0%} flow {run.server_cpu:.0%} ingest {run.ingest_cpu:.0%}"
    elif not math.isnan(run.ingest_cpu):
        cpu = f"cpu load {run.load_cpu:.0%} ingest {run.ingest_cpu:.0%}"
    line = (
        f"  {label:<34} {run.rate:>8,.0f} accepted/s  p50 {run.percentile(50):6.2f} ms  "
        f"p99 {run.percentile(99):6.2f} ms  ({run.seconds:.2f} s, {cpu})  {{{answers}}}"
    )
    journal = run.journal
    if journal is not None and journal.get("commits"):
        per_group = run.count(run.ok) / journal["commits"]
        line += (
            f"\n  {'':<34} journal: {journal['commits']:,} group commits "
            f"({per_group:.1f} messages each), submit-to-commit p50 "
            f"{journal['commit_p50_ms']:.2f} ms p99 {journal['commit_p99_ms']:.2f} ms, "
            f"of which the transaction (write + sync) p50 {journal['write_p50_ms']:.2f} ms "
            f"p99 {journal['write_p99_ms']:.2f} ms"
        )
    return line


def figures(values: list[float]) -> str:
    shown = " ".join(f"{v:.2f}" for v in values)
    return f"{shown} -> median {float(np.median(values)):.2f}"


def compare(
    transport: str,
    registry: DeviceRegistry,
    payloads: list[tuple[str, bytes]],
    tokens: dict[str, str],
    args: argparse.Namespace,
    pool: ProcessPoolExecutor,
    tmp: Path,
) -> bool:
    n = {"http": args.http_requests, "coap": args.coap_requests}.get(transport, args.mqtt_requests)
    requests = [(tokens[device], body) for device, body in payloads[: args.warmup + n]]
    warmup, timed = requests[: args.warmup], requests[args.warmup :]
    ok, busy = OK[transport], BUSY[transport]
    queue_setting = {} if args.queue is None else {"queue_messages": args.queue}
    kind = KINDS[transport]
    raw = sum(len(b) for _, b in timed)
    print(
        f"{transport.upper()}: {len(timed):,} requests ({kind}), {raw:,} bytes of telemetry JSON "
        f"from {args.devices} devices, {args.concurrency} in flight, after {len(warmup)} "
        f"warm-up requests; {args.rounds} round(s), sides (a), (b), (c) in turn"
    )

    bares: list[Run] = []
    flows: list[Run] = []
    journals: list[Run] = []
    sides = {"a": (run_bare, bares), "b": (run_with_flow, flows), "c": (run_journal_only, journals)}
    for r in range(args.rounds):
        data_dir = tmp / f"edge-{transport}-{r}"
        order = "abc"[r % 3 :] + "abc"[: r % 3]  # each side first in turn
        for side in order if r % 2 == 0 else reversed(order):
            run_side, runs = sides[side]
            config = parse_config({"data_dir": str(data_dir / side), "transports": queue_setting})
            runs.append(run_side(transport, registry, config, warmup, timed, args, pool))
        print(describe(f"round {r + 1} (a) server + bare drain:", bares[-1]))
        print(describe(f"round {r + 1} (b) server + telemetry flow:", flows[-1]))
        print(describe(f"round {r + 1} (c) ingest process, no flow:", journals[-1]))

    for label, over, under in (
        ("(b)/(a)", flows, bares),
        ("(c)/(a)", journals, bares),
        ("(b)/(c)", flows, journals),
    ):
        rates = [o.rate / u.rate if u.rate else math.nan for o, u in zip(over, under, strict=True)]
        p99s = [o.percentile(99) / u.percentile(99) for o, u in zip(over, under, strict=True)]
        print(f"  ratio {label} throughput:  {figures(rates)}")
        print(f"  ratio {label} p99 latency: {figures(p99s)}")
    queue = config.transports.queue_messages
    print(
        f"  {busy} answers (all rounds, warm-up included): "
        f"(a) {sum(r.count(busy) for r in bares)}, (b) {sum(r.count(busy) for r in flows)}, "
        f"(c) {sum(r.count(busy) for r in journals)}"
        f"   (queue bound {queue:,}; high water (a) {max(run.high_water for run in bares):,}, "
        f"(b) {max(run.high_water for run in flows):,})"
    )
    failed: Counter[str] = Counter()
    for run in (*bares, *flows, *journals):
        failed.update({k: v for k, v in (run.warmup + run.answers).items() if k not in (ok, busy)})
    if failed:
        shown = ", ".join(f"{k}: {v}" for k, v in sorted(failed.items()))
        print(f"  other answers or failures (all rounds, warm-up included): {shown}")

    consistent = True
    for label, runs in (("(a) bare drain", bares), ("(b) flow", flows), ("(c) journal", journals)):
        pairs = [(run.received, run.count(ok)) for run in runs]
        match = all(received == accepted for received, accepted in pairs)
        consistent &= match
        shown = ", ".join(f"{received:,}/{accepted:,}" for received, accepted in pairs)
        verdict = "ok" if match else "MISMATCH"
        print(f"  {label} received / {ok} answers per round (warm-up included): {shown}: {verdict}")
    meter = flows[-1].meter
    assert meter is not None
    rep = report(meter)
    print(
        f"  flow output (last round): {meter.totals[READINGS]:,} readings -> "
        f"{rep.output_rows.get('telemetry_points', 0):,} points, "
        f"{rep.output_rows.get('telemetry_summary', 0):,} summaries, "
        f"{rep.output_rows.get('dead_letters', 0):,} dead letters in Parquet"
    )
    return consistent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--http-requests", type=int, default=10_000)
    parser.add_argument("--coap-requests", type=int, default=4_000)
    parser.add_argument("--mqtt-requests", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3, help="(a)/(b) pairs per transport")
    parser.add_argument("--warmup", type=int, default=200, help="untimed requests first")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument(
        "--queue", type=int, default=None, help="hand-off queue bound (default: the config's)"
    )
    parser.add_argument("--batch", type=int, default=1_000, help="messages taken per drain")
    parser.add_argument(
        "--deadline", type=float, default=30.0, help="seconds allowed per timed load"
    )
    parser.add_argument(
        "--sync", choices=("full", "normal"), default="full", help="journal.sync of side (b)"
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=None,
        help="journal.partitions of side (b) (default: the config's)",
    )
    parser.add_argument(
        "--reader-priority",
        choices=("on", "off"),
        default="on",
        help="off: the flow's journal readers do not yield the CPU to ingest while caught up",
    )
    parser.add_argument("--transports", nargs="+", choices=TRANSPORTS, default=list(TRANSPORTS))
    args = parser.parse_args()
    if args.reader_priority == "off":
        PRIORITY.disable()
    counts = (
        args.http_requests,
        args.coap_requests,
        args.mqtt_requests,
        args.rounds,
        args.devices,
        args.concurrency,
    )
    if min(counts) < 1:
        parser.error(
            "--http-requests, --coap-requests, --mqtt-requests, --rounds, --devices, "
            "--concurrency must be >= 1"
        )
    if args.warmup < 0 or (args.queue is not None and args.queue < 1):
        parser.error("--warmup must be >= 0 and --queue >= 1")

    registry = DeviceRegistry(
        Device(f"sensor-{i:03d}", secrets.token_urlsafe(24)) for i in range(args.devices)
    )
    tokens = {device.id: device.token for device in registry}
    most = args.warmup + max(args.http_requests, args.coap_requests, args.mqtt_requests)
    payloads = telemetry_payloads(args.devices, -(-most // args.devices))

    consistent = True
    spawn = multiprocessing.get_context("spawn")
    with (
        tempfile.TemporaryDirectory() as tmp,
        ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool,
    ):
        pool.submit(int).result(timeout=START_TIMEOUT_S)  # load process started and imported
        for transport in args.transports:
            consistent &= compare(transport, registry, payloads, tokens, args, pool, Path(tmp))
    if not consistent:
        sys.exit("some accepted requests did not reach the flow (see MISMATCH above)")


if __name__ == "__main__":
    main()
