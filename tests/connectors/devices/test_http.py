"""The HTTP device API: real curl and aiohttp clients against the server, alone and in real flows."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import gzip
import json
import logging
import re
import socket
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiohttp
import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink

from connectors.codecs.evb1 import encode_evb1
from connectors.devices.http import HttpServer
from connectors.devices.ingress import DeviceServers, Ingress
from flows import telemetry, vibration
from flows.config import parse_config
from flows.machines import Machine, blocks
from operators.records import RawMessage
from tests.conftest import (
    TOKEN_1,
    TOKEN_2,
    curl,
    device_registry,
    edge_for,
    ipv6_loopback,
    ms,
    port_when_listening,
    query_parquet,
    require_curl,
)

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
EMPTY_TELEMETRY = 'empty body; POST JSON telemetry like {"temperature": 21.5}'
UNKNOWN_TOKEN = (
    "unknown access token; use the token of this device in devices.yaml (/api/v1/{token}/...)"
)
NOT_FOUND = (
    "no such endpoint; devices POST to /api/v1/{token}/telemetry, /api/v1/{token}/attributes, "
    "/api/v1/{token}/logs or /api/v1/{token}/vibration"
)


def base_url(server: HttpServer, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{server.port}"


def api(server: HttpServer, token: str, channel: str) -> str:
    return f"{base_url(server)}/api/v1/{token}/{channel}"


@pytest.fixture
def serve() -> Iterator[Callable[..., HttpServer]]:
    """Run HttpServers on DeviceServers' loop thread without a dataflow draining the ingress."""
    partitions = []

    def start(ingress: Ingress, listen: str = "127.0.0.1:0") -> HttpServer:
        server = HttpServer(listen, device_registry(), ingress)
        partitions.append(DeviceServers(ingress, [server]).build("http", 0, 1))
        return server

    yield start
    for partition in partitions:
        partition.close()


# --- end to end through the standard flows ---------------------------------------------------


def test_telemetry_flow_end_to_end(tmp_path, run_flow):
    config = parse_config(
        {
            "data_dir": str(tmp_path),
            "telemetry": {
                "deadband": {"absolute": 0.5, "max_silence": None},
                "window": {"length": 10, "allowed_lateness": 1},
            },
        }
    )
    ingress = Ingress()
    server = HttpServer("127.0.0.1:0", device_registry(), ingress)
    stop = threading.Event()
    source = DeviceServers(ingress, [server], stop=stop)
    edge = edge_for(telemetry.build, config, source=source, stop=stop, name="telemetry")
    runner = run_flow(edge.dataflow(), stops=[stop])
    port_when_listening(server)

    now = datetime.now(UTC)
    sent_at = now
    shapes = [
        (TOKEN_1, {"ts": ms(now - timedelta(seconds=3)), "values": {"temperature": 30.0}}),
        (TOKEN_1, {"pressure": 1.5, "status": "ok"}),  # no ts: the receive time
        (
            TOKEN_2,
            [
                {"ts": ms(now - timedelta(seconds=4)), "values": {"humidity": 40}},
                {"ts": ms(now - timedelta(seconds=2)), "values": {"humidity": 45.5, "on": True}},
            ],
        ),
    ]
    content_types = ("application/json", "text/plain; charset=utf-8", None)
    for (token, doc), ctype in zip(shapes, content_types, strict=True):
        headers = () if ctype is None else (f"Content-Type: {ctype}",)
        reply = curl(api(server, token, "telemetry"), json.dumps(doc).encode(), headers=headers)
        assert (reply.status, json.loads(reply.body)) == (200, {"status": "accepted"})
        assert reply.headers["content-type"].startswith("application/json")
    # curl's -d default (form-urlencoded) is accepted too: the path names the channel
    form = curl(api(server, TOKEN_2, "telemetry"), args=("-d", '{"rpm": 1480}'))
    assert (form.status, form.json) == (200, {"status": "accepted"})

    url = api(server, TOKEN_1, "telemetry")
    stop.set()
    runner.join()
    with pytest.raises(RuntimeError, match=r"exit 7\)"):  # stopped: connection refused
        curl(url, b'{"x": 1}')

    points = query_parquet(
        tmp_path,
        "telemetry_points",
        "select device, key, value, transport, ts from {src} order by device, key, ts",
    )
    assert [p[:4] for p in points] == [
        ("fan-2", "humidity", 40.0, "http"),
        ("fan-2", "humidity", 45.5, "http"),
        ("fan-2", "on", 1.0, "http"),
        ("fan-2", "rpm", 1480.0, "http"),
        ("pump-1", "pressure", 1.5, "http"),
        ("pump-1", "temperature", 30.0, "http"),
    ]
    pressure_ts = points[4][4]
    assert sent_at - timedelta(seconds=1) <= pressure_ts <= datetime.now(UTC)
    text = query_parquet(
        tmp_path, "telemetry_text", "select device, key, value, transport from {src}"
    )
    assert text == [("pump-1", "status", "ok", "http")]
    assert query_parquet(tmp_path, "dead_letters", "select count(*) from {src}") in ([], [(0,)])
    assert ingress.accepted == 4 and len(ingress) == 0


def test_vibration_flow_end_to_end(tmp_path, run_flow):
    config = parse_config({"data_dir": str(tmp_path), "vibration": {"frames_per_row": 1}})
    ingress = Ingress()
    server = HttpServer("127.0.0.1:0", device_registry(), ingress)
    stop = threading.Event()
    source = DeviceServers(ingress, [server], stop=stop)
    edge = edge_for(vibration.build, config, source=source, stop=stop, name="vibration")
    runner = run_flow(edge.dataflow(), stops=[stop])
    port_when_listening(server)

    payloads = blocks(Machine("imbalance", seed=5), device="fan-2", count=3, start_ts=T0)
    assert all(len(p) > 40_000 for p in payloads)  # 4096 frames x 3 axes x float32
    for payload in payloads:
        reply = curl(
            api(server, TOKEN_2, "vibration"),
            payload,
            headers=("Content-Type: application/octet-stream",),
        )
        assert reply.status == 200, reply.body
    stop.set()
    runner.join()

    rows = query_parquet(
        tmp_path,
        "vibration_features",
        "select device, axis, transport, count(*), min(ts), max(velocity_rms_mm_s) "
        "from {src} group by all order by axis",
    )
    assert [r[:4] for r in rows] == [("fan-2", a, "http", 3) for a in "xyz"]
    assert all(r[4] == T0 for r in rows)
    assert rows[0][5] > 4.5  # imbalance: ISO zone D on x
    assert query_parquet(tmp_path, "dead_letters", "select count(*) from {src}") in ([], [(0,)])


# --- the bad-input matrix ---------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One request of the matrix: what is sent, what must come back, and whether it is kept."""

    server: HttpServer
    token: str
    path: str
    body: bytes | None
    status: int
    reason: str | None = None
    """A regex the ``error`` text must start with."""
    dead: bool = False
    """Whether the body must be stored as a dead letter."""
    method: str | None = None
    args: tuple[str, ...] = ()


def test_bad_input_matrix(tmp_path, run_flow):
    limit = 64 * 1024
    dirs = {name: tmp_path / name for name in ("telemetry", "vibration")}
    servers: dict[str, HttpServer] = {}
    stops = []
    runners = []
    for name, module, section in (
        ("telemetry", telemetry, {"deadband": {"absolute": 0.5, "max_silence": None}}),
        ("vibration", vibration, {"frames_per_row": 1}),
    ):
        config = parse_config({"data_dir": str(dirs[name]), name: section})
        ingress = Ingress(max_payload_bytes=limit)
        servers[name] = HttpServer("127.0.0.1:0", device_registry(), ingress)
        stop = threading.Event()
        stops.append(stop)
        source = DeviceServers(ingress, [servers[name]], stop=stop)
        edge = edge_for(module.build, config, source=source, stop=stop, name=name)
        runners.append(run_flow(edge.dataflow(), stops=[stop]))
    for server in servers.values():
        port_when_listening(server)
    tel, vib = servers["telemetry"], servers["vibration"]
    now = datetime.now(UTC)

    def good_reading(seconds: int, value: float) -> bytes:
        return json.dumps(
            {"ts": ms(now + timedelta(seconds=seconds)), "values": {"t": value}}
        ).encode()

    good_blocks = blocks(Machine("healthy", seed=2), device="fan-2", count=3, start_ts=T0)
    big_block = encode_evb1(
        Machine("healthy", seed=2).signal(0, 6000), sample_rate_hz=25_600, start_ts=T0
    )
    assert len(big_block) > limit

    cases = [
        Case(tel, TOKEN_1, "telemetry", good_reading(-9, 1.0), 200),
        Case(tel, TOKEN_1, "telemetry", b'{"t": 21.5', 400, dead=True, reason=(
            r"telemetry: not valid JSON \(Expecting ',' delimiter at line 1 column 11\); "
            r"send UTF-8 JSON")),
        Case(tel, TOKEN_1, "telemetry", b'{"t": [1, NaN]}', 400, dead=True, reason=(
            r"telemetry: value of 't' holds NaN, Infinity or an unpaired surrogate; send ")),
        Case(tel, TOKEN_2, "telemetry", b"{}", 200, args=("-H", "Content-Type: application/json")),
        Case(tel, TOKEN_1, "attributes", b'{"fw": "1.4.2"}', 200,
             args=("-H", "Content-Type: application/json")),
        Case(tel, TOKEN_1, "attributes", b"[1]", 400, dead=True, reason=(
            r"attributes: top-level JSON is an array; send one JSON object of attributes")),
        Case(tel, TOKEN_1, "attributes", b"", 400,
             reason=r'empty body; POST a JSON object of attributes like \{"firmware": "1\.4\.2"\}'),
        Case(tel, "not-a-known-token", "attributes", b'{"fw": "1"}', 401,
             reason=re.escape(UNKNOWN_TOKEN)),
        Case(tel, TOKEN_2, "telemetry", b'{"t": NaN}', 400, dead=True,
             reason=r"telemetry: value of 't' is NaN; send finite numbers"),
        Case(tel, TOKEN_2, "telemetry", good_reading(-8, 5.0), 200),
        Case(tel, TOKEN_1, "telemetry", b"", 400, reason=re.escape(EMPTY_TELEMETRY)),
        Case(tel, "not-a-known-token", "telemetry", b'{"t": 99.25}', 401,
             reason=re.escape(UNKNOWN_TOKEN)),
        Case(tel, TOKEN_1, "telemetry", None, 405, method="GET",
             reason=r"method GET is not allowed here; use POST"),
        Case(tel, TOKEN_1, "telemetry", b'{"t": 98.5}', 405, method="PUT",
             reason=r"method PUT is not allowed here; use POST"),
        Case(tel, TOKEN_1, "alarms", b'{"t": 97.5}', 404, reason=re.escape(NOT_FOUND)),
        Case(tel, TOKEN_1, "telemetry/extra", b'{"t": 96.5}', 404, reason=re.escape(NOT_FOUND)),
        Case(tel, TOKEN_1, "telemetry", json.dumps({"t": 1, "pad": "x" * limit}).encode(), 413,
             reason=r"Content-Length \d+ is over the 65536-byte limit; split the payload into "
             r"smaller messages"),
        Case(tel, TOKEN_2, "telemetry", good_reading(-7, 9.0), 200),
        Case(vib, TOKEN_2, "vibration", good_blocks[0], 200),
        Case(vib, TOKEN_2, "vibration", good_blocks[1][:-3], 400, dead=True, reason=(
            r"vibration: truncated block: 49149 sample bytes is not a multiple of 12 "
            r"\(3 axes x float32\)")),
        Case(vib, TOKEN_2, "vibration", b"EVB2" + good_blocks[1][4:], 400, dead=True,
             reason=r"vibration: bad magic b'EVB2', expected b'EVB1'"),
        Case(vib, TOKEN_2, "vibration", good_blocks[1], 200),
        Case(vib, TOKEN_2, "vibration", big_block, 413,
             reason=r"Content-Length 72024 is over the 65536-byte limit"),
        Case(vib, TOKEN_2, "vibration", big_block, 413, args=("-H", "Transfer-Encoding: chunked"),
             reason=r"payload is over the 65536-byte limit \(refused while reading\); split it "
             r"into smaller messages"),
        Case(vib, TOKEN_2, "vibration", big_block, 413, args=("-H", "Expect: 100-continue"),
             reason=r"Content-Length 72024 is over the 65536-byte limit"),
        Case(vib, TOKEN_1, "vibration", b"", 400,
             reason=r"empty body; POST one EVB1 block as application/octet-stream"),
        Case(vib, "not-a-known-token", "vibration", good_blocks[2][:100], 401,
             reason=re.escape(UNKNOWN_TOKEN)),
        Case(vib, TOKEN_2, "vibration", None, 405, method="DELETE",
             reason=r"method DELETE is not allowed here; use POST"),
        Case(vib, TOKEN_2, "vibration", good_blocks[2], 200,
             args=("-H", "Content-Type: application/octet-stream")),
    ]  # fmt: skip
    answers: dict[int, str] = {}
    for index, case in enumerate(cases):
        url = f"{base_url(case.server)}/api/v1/{case.token}/{case.path}"
        reply = curl(url, case.body, method=case.method, args=case.args)
        assert reply.status == case.status, (index, reply)
        if case.status == 200:
            assert json.loads(reply.body) == {"status": "accepted"}
            continue
        assert reply.headers["content-type"].startswith("application/json"), (index, reply)
        assert re.fullmatch(rf"{case.reason}.*", reply.error), (index, reply.error)
        if case.status == 405:
            assert reply.headers["allow"] == "POST"
        # a refusal before the body was read closes the connection; the others keep it
        assert (reply.headers.get("connection") == "close") == (case.status in (401, 413)), index
        answers[index] = reply.error
    # wrong paths that are not device paths at all
    for path in ("/", "/api/v1", f"/api/v2/{TOKEN_1}/telemetry"):
        reply = curl(f"{base_url(tel)}{path}", b'{"t": 95.5}')
        assert (reply.status, reply.error) == (404, NOT_FOUND)

    for stop in stops:
        stop.set()
    for runner in runners:
        runner.join()

    for name, server in servers.items():
        expected = sorted(
            (case.body, answers[i])
            for i, case in enumerate(cases)
            if case.server is server and case.dead
        )
        stored = query_parquet(
            dirs[name], "dead_letters", "select payload, reason, transport from {src}"
        )
        # exactly the accepted bad bodies, with the reason the device was told
        assert sorted((bytes(p), r) for p, r, _ in stored) == expected
        assert {t for *_, t in stored} == {"http"}
    points = query_parquet(
        dirs["telemetry"], "telemetry_points", "select device, value from {src} order by value"
    )
    assert points == [("pump-1", 1.0), ("fan-2", 5.0), ("fan-2", 9.0)]
    attributes = query_parquet(
        dirs["telemetry"], "device_attributes", "select device, key, value, source from {src}"
    )
    assert attributes == [("pump-1", "fw", '"1.4.2"', "http")]
    features = query_parquet(
        dirs["vibration"], "vibration_features", "select count(*), min(ts) from {src}"
    )
    assert features == [(9, T0)]  # 3 good blocks x 3 axes, in order, nothing lost


# --- overload ---------------------------------------------------------------------------------


async def flood(
    url: str, count: int, *, concurrency: int = 20
) -> list[tuple[int, str | None, dict]]:
    """POST ``count`` small bodies, ``concurrency`` at a time; (status, Retry-After, JSON) each."""
    limit = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=20)

    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(i: int) -> tuple[int, str | None, dict]:
            async with limit, session.post(url, data=json.dumps({"n": i}).encode()) as resp:
                return resp.status, resp.headers.get("Retry-After"), await resp.json()

        return await asyncio.gather(*(one(i) for i in range(count)))


def test_overload_answers_503_and_the_queue_stays_bounded(serve):
    ingress = Ingress(max_messages=5, retry_after_s=2)
    server = serve(ingress)
    replies = asyncio.run(flood(api(server, TOKEN_1, "telemetry"), 200))

    ok = [r for r in replies if r[0] == 200]
    busy = [r for r in replies if r[0] == 503]
    assert len(ok) == 5 and len(busy) == 195
    assert all(r[1:] == ("2", {"error": "edge is busy; retry in 2s"}) for r in busy)
    assert ingress.high_water == 5 and len(ingress) == 5 and ingress.refused == 195

    # Expect: 100-continue is refused before the body is sent
    reply = curl(
        api(server, TOKEN_1, "telemetry"), b'{"late": 1}', headers=("Expect: 100-continue",)
    )
    assert (reply.status, reply.headers["retry-after"], reply.error) == (
        503,
        "2",
        "edge is busy; retry in 2s",
    )
    assert ingress.refused == 196

    taken = ingress.take(100)
    assert sorted(json.loads(m.payload)["n"] for m in taken) == [
        i for i, r in enumerate(replies) if r[0] == 200
    ]
    assert curl(api(server, TOKEN_1, "telemetry"), b'{"n": -1}').status == 200  # recovered


def test_overload_with_a_slow_flow_loses_no_accepted_message(run_flow):
    ingress = Ingress(max_messages=5, retry_after_s=1)
    server = HttpServer("127.0.0.1:0", device_registry(), ingress)
    stop = threading.Event()
    out: list[RawMessage] = []

    def slow(msg: RawMessage) -> RawMessage:
        time.sleep(0.02)
        return msg

    flow = Dataflow("slow")
    raw = op.input("in", flow, DeviceServers(ingress, [server], stop=stop, max_batch=5))
    op.output("out", op.map("slow", raw, slow), TestingSink(out))
    runner = run_flow(flow, stops=[stop])
    port_when_listening(server)

    replies = asyncio.run(flood(api(server, TOKEN_2, "telemetry"), 200))
    stop.set()
    runner.join()

    statuses = [r[0] for r in replies]
    assert set(statuses) <= {200, 503} and statuses.count(503) > 0
    assert ingress.high_water <= 5
    delivered = sorted(json.loads(m.payload)["n"] for m in out)
    assert len(delivered) == statuses.count(200) == ingress.accepted
    assert len(set(delivered)) == len(delivered)
    assert {m.transport for m in out} == {"http"} and {m.device for m in out} == {"fan-2"}


# --- connections, limits, logs ------------------------------------------------------------------


def test_keep_alive_several_requests_on_one_connection(serve):
    require_curl()
    ingress = Ingress()
    server = serve(ingress)
    url = api(server, TOKEN_1, "telemetry")
    cmd = ["curl", "-sS", "--max-time", "10", "-o", "/dev/null"]
    for i in range(5):
        if i:
            cmd.append("--next")
        cmd += [
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{num_connects}\n",
            "-d",
            f'{{"n": {i}}}',
            url,
        ]
    proc = subprocess.run(cmd, capture_output=True, timeout=20, check=True, text=True)
    assert proc.stdout.split("\n")[:5] == ["200 1", "200 0", "200 0", "200 0", "200 0"]

    # a 400 keeps the connection too; an aiohttp session makes one connection for all
    connects = 0

    async def count_connects(*_: object) -> None:
        nonlocal connects
        connects += 1

    async def session_run() -> list[int]:
        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(count_connects)
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
            statuses = []
            for i in range(20):
                body = b"{bad" if i % 5 == 0 else json.dumps({"n": i}).encode()
                async with session.post(url, data=body) as resp:
                    await resp.read()
                    statuses.append(resp.status)
            return statuses

    statuses = asyncio.run(session_run())
    assert statuses == [400 if i % 5 == 0 else 200 for i in range(20)]
    assert connects == 1
    assert len(ingress) == 25


def test_stop_closes_idle_keep_alive_connections():
    ingress = Ingress()
    server = HttpServer("127.0.0.1:0", device_registry(), ingress)
    partition = DeviceServers(ingress, [server]).build("http", 0, 1)
    port = server.port
    with (
        contextlib.closing(partition),
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
    ):
        body = b'{"n": 1}'
        sock.sendall(
            f"POST /api/v1/{TOKEN_1}/telemetry HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = b""
        while b'"accepted"}' not in head:
            chunk = sock.recv(4096)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 200")
        assert b"connection: close" not in head.lower()
        started = time.monotonic()
        partition.close()
        assert sock.recv(4096) == b""  # the server closed the idle connection
        assert time.monotonic() - started < 5
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_gzip_bodies_are_decompressed_and_bounded_after_decompression(serve):
    ingress = Ingress(max_payload_bytes=64 * 1024)
    server = serve(ingress)
    url = api(server, TOKEN_1, "telemetry")
    doc = {"temperature": 21.5}
    reply = curl(url, gzip.compress(json.dumps(doc).encode()), headers=("Content-Encoding: gzip",))
    assert reply.status == 200
    [msg] = ingress.take(10)
    assert json.loads(msg.payload) == doc and msg.device == "pump-1"

    bomb = gzip.compress(b'{"t": "' + b"0" * 1_000_000 + b'"}')
    assert len(bomb) < 64 * 1024
    reply = curl(url, bomb, headers=("Content-Encoding: gzip",))
    assert reply.status == 413
    assert reply.error == (
        "payload is over the 65536-byte limit (refused while reading); split it into smaller messages"
    )
    assert len(ingress) == 0


def test_ingress_verdict_too_large_maps_to_413(serve):
    ingress = Ingress(max_payload_bytes=1000)
    server = serve(ingress)
    ingress.max_payload_bytes = 100  # lowered after start: aiohttp still reads up to 1000 bytes
    reply = curl(
        api(server, TOKEN_1, "telemetry"),
        json.dumps({"pad": "x" * 200}).encode(),
        headers=("Transfer-Encoding: chunked",),
    )
    assert (reply.status, reply.error) == (
        413,
        "payload of 211 bytes is over the 100-byte limit; split it into smaller messages",
    )


def test_unsupported_expectation_is_417(serve):
    server = serve(Ingress())
    reply = curl(api(server, TOKEN_1, "telemetry"), b'{"a": 1}', headers=("Expect: magic",))
    assert (reply.status, reply.error) == (
        417,
        "Expect: 'magic' is not supported; send 'Expect: 100-continue' or no Expect header",
    )
    # HTTP/1.0 ignores the expectation and takes the body
    reply = curl(
        api(server, TOKEN_1, "telemetry"),
        b'{"a": 1}',
        headers=("Expect: 100-continue",),
        args=("--http1.0", "--expect100-timeout", "0.1"),
    )
    assert reply.status == 200


def test_unexpected_failure_is_a_json_500_and_logged(serve, caplog, monkeypatch):
    ingress = Ingress()
    server = serve(ingress)

    def broken(*_: object) -> None:
        msg = "injected fault"
        raise RuntimeError(msg)

    monkeypatch.setattr(ingress, "offer", broken)
    with caplog.at_level(logging.ERROR, logger="edgesieve.http"):
        reply = curl(api(server, TOKEN_1, "telemetry"), b'{"a": 1}')
    assert (reply.status, reply.error) == (500, "internal error in the edge; see its logs")
    assert "http: POST /api/v1/{token}/telemetry failed" in caplog.text
    assert "injected fault" in caplog.text and TOKEN_1 not in caplog.text


def test_tokens_never_reach_the_logs(serve, caplog):
    caplog.set_level(logging.DEBUG)
    ingress = Ingress(max_messages=2, max_payload_bytes=1000)
    server = serve(ingress)
    unknown = "unknown-token-Qx7"
    curl(api(server, TOKEN_1, "telemetry"), b'{"a": 1}')
    curl(api(server, TOKEN_2, "telemetry"), b"{oops")
    curl(api(server, TOKEN_2, "vibration"), b"EVB0....")  # queue full now: 503
    curl(api(server, unknown, "telemetry"), b'{"a": 1}')
    curl(api(server, TOKEN_1, "telemetry"), b"x" * 2000)
    curl(api(server, TOKEN_1, "telemetry"), method="GET")
    curl(f"{base_url(server)}/api/v2/{TOKEN_1}/telemetry", b'{"a": 1}')
    curl(f"{base_url(server)}/{TOKEN_1}", b'{"a": 1}')
    # a request line aiohttp cannot parse, holding the token
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(f"POST /api/v1/{TOKEN_1}/tele metry HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.0 400")
    time.sleep(0.1)  # the parse error is logged after the answer

    log = caplog.text + "".join(r.getMessage() for r in caplog.records)
    for token in (TOKEN_1, TOKEN_2, unknown):
        assert token not in log
    access = [r.getMessage() for r in caplog.records if r.name == "edgesieve.http.access"]
    assert len(access) == 9
    assert access[-1].startswith("127.0.0.1 UNKNOWN (unparsed request) 400 ")
    assert any(
        re.fullmatch(
            r"127\.0\.0\.1 POST /api/v1/\{token\}/telemetry 200 \d+B [\d.]+s device=pump-1", a
        )
        for a in access
    ), access
    assert any(" 401 " in a and a.endswith("device=-") for a in access)
    assert sum("(no route)" in a for a in access) == 3  # GET (405) and the two 404s
    assert re.search(
        r"Error handling request from 127\.0\.0\.1: BadStatusLine \(HTTP 400\); "
        r"the request text is not logged, it may hold a device token",
        caplog.text,
    )


# --- addresses and lifecycle ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        (8080, r"HttpServer\.listen: must be HOST:PORT, e\.g\. .* \(got 8080\); hint: write it"),
        ("8080", r"HttpServer\.listen: must be HOST:PORT, .* \(got '8080'\); hint: give both"),
        ("::1:8080", r"\(got '::1:8080'\); hint: put an IPv6 address in brackets: \[::1\]:8080"),
    ],
)
def test_listen_is_checked(listen, message):
    with pytest.raises(ValueError, match=message):
        HttpServer(listen, device_registry(), Ingress())


def test_port_before_start_and_double_start_are_errors():
    server = HttpServer("127.0.0.1:0", device_registry(), Ingress())
    with pytest.raises(
        RuntimeError,
        match=r"HttpServer\('127\.0\.0\.1:0'\)\.port: not started yet; await start\(\) first",
    ):
        _ = server.port

    async def twice() -> None:
        await server.start()
        try:
            with pytest.raises(
                RuntimeError,
                match=r"HttpServer\('127\.0\.0\.1:0'\)\.start: already started; stop\(\) it first",
            ):
                await server.start()
        finally:
            await server.stop()
            await server.stop()  # idempotent

    asyncio.run(twice())
    assert repr(server) == "HttpServer('127.0.0.1:0')"


def test_port_in_use_is_a_clear_error(taken_port):
    port = taken_port
    ingress = Ingress()
    source = DeviceServers(ingress, [HttpServer(f"127.0.0.1:{port}", device_registry(), ingress)])
    with pytest.raises(
        OSError, match=rf"HttpServer: cannot listen on '127\.0\.0\.1:{port}': "
    ) as info:
        source.build("http", 0, 1)
    assert info.value.errno == errno.EADDRINUSE
    assert f"hint: another process may hold port {port}" in str(info.value)


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_ipv6_loopback(serve):
    ingress = Ingress()
    server = serve(ingress, "[::1]:0")
    reply = curl(f"{base_url(server, '[::1]')}/api/v1/{TOKEN_2}/telemetry", b'{"v6": 1}')
    assert reply.status == 200
    [msg] = ingress.take(5)
    assert (msg.device, msg.channel, msg.transport, msg.payload) == (
        "fan-2",
        "telemetry",
        "http",
        b'{"v6": 1}',
    )


# --- protocol edges: encodings, parse errors, clients that vanish, one device's share ----------

ENCODING_HINT = "send the body uncompressed, or compressed with gzip or deflate"


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing at WARNING or above and no traceback in what the edge logged."""
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not loud, [(r.name, r.levelname, r.getMessage()) for r in loud]
    assert "Traceback" not in caplog.text


def raw_request(port: int, request: bytes) -> tuple[bytes, bytes]:
    """Send ``request`` on a fresh connection; the answer's head and body (read to close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


def test_content_encodings(serve, caplog):
    caplog.set_level(logging.DEBUG)
    ingress = Ingress()
    server = serve(ingress)
    url = api(server, TOKEN_1, "telemetry")
    doc = b'{"temperature": 21.5}'
    for encoding, body in (
        ("deflate", zlib.compress(doc)),
        ("DEFLATE", zlib.compress(doc)[2:-4]),  # raw deflate, no zlib header: accepted as well
        ("gzip", gzip.compress(doc)),
        ("identity", doc),
    ):
        reply = curl(url, body, headers=(f"Content-Encoding: {encoding}",))
        assert reply.status == 200, (encoding, reply)
    assert [m.payload for m in ingress.take(10)] == [doc] * 4

    refused = {
        ("deflate", b"garbage-not-deflate"): (
            "body is not valid deflate data (Content-Encoding: deflate); compress it with "
            "deflate, or send it uncompressed without the header"
        ),
        ("deflate", zlib.compress(doc)[:-6]): (  # truncated stream
            "body is not valid deflate data (Content-Encoding: deflate); compress it with "
            "deflate, or send it uncompressed without the header"
        ),
        ("gzip", b"\x1f\x8b garbage"): (
            "body is not valid gzip data (Content-Encoding: gzip); compress it with gzip, "
            "or send it uncompressed without the header"
        ),
        ("x-custom", doc): f"Content-Encoding 'x-custom' is not supported; {ENCODING_HINT}",
        ("gzip, gzip", gzip.compress(gzip.compress(doc))): (
            f"Content-Encoding 'gzip, gzip' is not supported; {ENCODING_HINT}"
        ),
        # aiohttp refuses these itself, before routing, unless Brotli / zstd are installed
        ("br", doc): f"Content-Encoding brotli (br) is not supported; {ENCODING_HINT}",
        ("zstd", doc): f"Content-Encoding zstandard (zstd) is not supported; {ENCODING_HINT}",
    }
    for (encoding, body), reason in refused.items():
        reply = curl(url, body, headers=(f"Content-Encoding: {encoding}",))
        assert (reply.status, reply.error) == (400, reason), encoding
        assert reply.headers["content-type"].startswith("application/json")
    # two Content-Encoding headers are one list
    reply = curl(url, doc, headers=("Content-Encoding: identity", "Content-Encoding: gzip"))
    assert (reply.status, reply.error) == (
        400,
        f"Content-Encoding 'identity, gzip' is not supported; {ENCODING_HINT}",
    )
    # refused before the body is sent
    reply = curl(url, doc, headers=("Content-Encoding: compress", "Expect: 100-continue"))
    assert (reply.status, reply.error) == (
        400,
        f"Content-Encoding 'compress' is not supported; {ENCODING_HINT}",
    )
    assert len(ingress) == 0
    no_tracebacks(caplog)
    assert curl(url, doc).status == 200  # and the server is fine


def test_requests_aiohttp_cannot_parse_get_json_errors(serve, caplog):
    caplog.set_level(logging.DEBUG)
    ingress = Ingress()
    server = serve(ingress)
    hint = (
        "hint: devices POST to /api/v1/{token}/telemetry, /api/v1/{token}/attributes, "
        "/api/v1/{token}/logs or /api/v1/{token}/vibration "
        "in HTTP/1.1 with well-formed headers"
    )
    path = f"/api/v1/{TOKEN_1}/telemetry"
    cases = {
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n": (
            "Invalid character in Content-Length"
        ),
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n": (
            "Duplicate Content-Length"
        ),
        f"POST {path} HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n": "Invalid header",
        f"POST {path} HTTP/9.9\r\nHost: x\r\n\r\n": "",
        f"POST {path} HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 9000}\r\n\r\n": (
            "Got more than 8190 bytes when reading; hint"
        ),
        f"POST {path}{'t' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n": (
            "Got more than 8190 bytes when reading; hint"
        ),
        "\x16\x03\x01 tls hello\r\n\r\n": "Received HTTPS traffic on an HTTP port; hint",
        f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n": "",
    }
    for request, detail in cases.items():
        head, body = raw_request(server.port, request.encode())
        assert head.startswith(b"HTTP/1.0 400") or head.startswith(b"HTTP/1.1 400"), head
        assert b"application/json" in head, head
        error = json.loads(body)["error"]
        assert error.startswith(f"malformed HTTP request: {detail}"), error
        assert error.endswith(f"; {hint}"), error
        assert TOKEN_1 not in error
    assert len(ingress) == 0
    no_tracebacks(caplog)
    parse_errors = [r for r in caplog.records if r.getMessage().startswith("Error handling")]
    assert len(parse_errors) == len(cases)
    assert {r.levelname for r in parse_errors} <= {"INFO", "DEBUG"}


def test_clients_that_vanish_mid_body_are_one_info_line_each(serve, caplog):
    caplog.set_level(logging.DEBUG)
    ingress = Ingress()
    server = serve(ingress)
    head = f"POST /api/v1/{TOKEN_1}/telemetry HTTP/1.1\r\nHost: x\r\n"
    sockets = []
    for i in range(30):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        if i % 3 == 2:  # chunked, stopped inside a chunk
            sock.sendall(f'{head}Transfer-Encoding: chunked\r\n\r\n10\r\n{{"t"'.encode())
        elif i % 3 == 1:  # gzip, stopped inside the stream
            part = gzip.compress(b'{"t": 1}')[:8]
            sock.sendall(
                f"{head}Content-Encoding: gzip\r\nContent-Length: 100\r\n\r\n".encode() + part
            )
        else:
            sock.sendall(f'{head}Content-Length: 1000\r\n\r\n{{"t": '.encode())
        sockets.append(sock)
    wait_until = time.monotonic() + 10
    while time.monotonic() < wait_until and (server._in_flight["pump-1"], ingress.refused) != (
        8,
        22,
    ):
        time.sleep(0.01)
    # the first 8 are in progress (the per-device limit); the rest were refused with 503
    assert (server._in_flight["pump-1"], ingress.refused) == (8, 22)
    for sock in sockets:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # a reset, as a dropped connection

    def closed_lines() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "edgesieve.http" and "closed the connection" in r.getMessage()
        ]

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(closed_lines()) < 8:
        time.sleep(0.05)
    lines = closed_lines()
    assert len(lines) == 8, lines
    assert all(
        re.fullmatch(
            r"http: pump-1 closed the connection after \d+ of (1000|100|\?) body bytes "
            r"\(POST /api/v1/\{token\}/telemetry\); nothing was stored",
            line,
        )
        for line in lines
    ), lines
    assert {r.levelname for r in caplog.records if r.getMessage() in lines} == {"INFO"}
    access = [r.getMessage() for r in caplog.records if r.name == "edgesieve.http.access"]
    assert sum(" 499 " in a for a in access) == 8
    assert ingress.aborted == 8
    no_tracebacks(caplog)
    assert len(ingress) == 0 and not server._in_flight
    assert curl(api(server, TOKEN_1, "telemetry"), b'{"t": 2}').status == 200


def test_stopping_with_a_body_in_progress_is_quiet(caplog):
    caplog.set_level(logging.DEBUG)
    ingress = Ingress()
    server = HttpServer("127.0.0.1:0", device_registry(), ingress)
    partition = DeviceServers(ingress, [server]).build("http", 0, 1)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            f"POST /api/v1/{TOKEN_2}/telemetry HTTP/1.1\r\nHost: x\r\n"
            'Content-Length: 100\r\n\r\n{"t": '.encode()
        )
        wait_until = time.monotonic() + 5
        while time.monotonic() < wait_until and not server._in_flight:
            time.sleep(0.01)
        # a request refused before its body, whose client then leaves: aiohttp lingers over it
        reply = curl(
            api(server, "not-a-known-token", "telemetry"),
            b'{"t": 1}',
            headers=("Expect: 100-continue",),
        )
        assert reply.status == 401
        partition.close()  # waits the shutdown timeout, then cancels the request
        assert sock.recv(4096) == b""
    gc.collect()  # a task left pending on the closed loop would be reported now
    no_tracebacks(caplog)
    [line] = [r for r in caplog.records if "cancelled while reading" in r.getMessage()]
    assert line.levelname == "DEBUG"
    assert line.getMessage() == (
        "http: POST /api/v1/{token}/telemetry from fan-2 cancelled while reading its body "
        "(the edge is stopping); nothing was stored"
    )
    assert len(ingress) == 0


def test_one_device_cannot_hold_every_request_slot(serve):
    ingress = Ingress(retry_after_s=3)
    server = HttpServer("127.0.0.1:0", device_registry(), ingress, max_requests_per_device=2)
    partition = DeviceServers(ingress, [server]).build("http", 0, 1)
    busy = (
        "device pump-1 already has 2 requests in progress "
        "(transports.http.max_requests_per_device); wait for their answers, retry in 3s"
    )
    url = api(server, TOKEN_1, "telemetry")
    with contextlib.closing(partition), contextlib.ExitStack() as stack:
        slow = []
        for _ in range(2):
            sock = stack.enter_context(
                socket.create_connection(("127.0.0.1", server.port), timeout=5)
            )
            sock.sendall(
                f"POST /api/v1/{TOKEN_1}/telemetry HTTP/1.1\r\nHost: x\r\n"
                'Content-Length: 8\r\n\r\n{"t": '.encode()
            )
            slow.append(sock)
        wait_for_slots = time.monotonic() + 5
        while time.monotonic() < wait_for_slots and server._in_flight["pump-1"] < 2:
            time.sleep(0.01)
        reply = curl(url, b'{"t": 3}')
        assert (reply.status, reply.headers["retry-after"], reply.error) == (503, "3", busy)
        assert reply.headers.get("connection") == "close"
        reply = curl(url, b'{"t": 3}', headers=("Expect: 100-continue",))
        assert (reply.status, reply.error) == (503, busy)
        # other devices are served
        assert curl(api(server, TOKEN_2, "telemetry"), b'{"t": 4}').status == 200
        # a request that completes frees its slot
        slow[0].sendall(b"1}")
        assert slow[0].recv(4096).startswith(b"HTTP/1.1 200")
        assert curl(url, b'{"t": 5}').status == 200
    assert ingress.refused == 2
    assert sorted(json.loads(m.payload)["t"] for m in ingress.take(10)) == [1, 4, 5]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8"])
def test_max_requests_per_device_is_checked(bad):
    with pytest.raises(
        ValueError,
        match=rf"HttpServer: max_requests_per_device must be a positive integer "
        rf"\(got {re.escape(repr(bad))}\); hint: 8 lets a device pipeline a few requests",
    ):
        HttpServer("127.0.0.1:0", device_registry(), Ingress(), max_requests_per_device=bad)


def test_a_connection_that_never_finishes_its_headers_is_closed(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr("connectors.devices.http.KEEPALIVE_TIMEOUT_S", 0.5)
    ingress = Ingress()
    server = HttpServer("127.0.0.1:0", device_registry(), ingress)
    partition = DeviceServers(ingress, [server]).build("http", 0, 1)
    with (
        contextlib.closing(partition),
        socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock,
    ):
        started = time.monotonic()
        sock.sendall(f"POST /api/v1/{TOKEN_1}/telemetry HTTP/1.1\r\nHost: x\r\n".encode())
        for _ in range(3):  # trickle a header line now and then
            time.sleep(0.2)
            with contextlib.suppress(OSError):
                sock.sendall(b"X-Slow: 1\r\n")
        assert sock.recv(4096) == b""  # closed by the server, without an answer
        assert time.monotonic() - started < 3
    no_tracebacks(caplog)
    assert len(ingress) == 0 and not server._in_flight
