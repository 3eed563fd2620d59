"""CoapServer with libcoap's real client and aiocoap clients, inside real dataflows."""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiocoap
import pytest
from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption

from connectors.devices import coap as coap_module
from connectors.devices.coap import WIRE_LOGGER, CoapServer
from connectors.devices.ingress import DeviceServers, Ingress
from flows import telemetry, vibration
from flows.accounting import Meter
from flows.config import parse_config
from flows.machines import Machine, blocks
from tests.conftest import (
    coap_client,
    device_registry,
    edge_for,
    ipv6_loopback,
    ms,
    query_parquet,
)

TOKEN = "tok-pump7-Qx81mZrV"
FAN_TOKEN = "tok-fan2-Lw40pKbN"
STRANGER = "tok-unknown-Hd93sJqT"
T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
REQUEST_TIMEOUT_S = 5.0

DEVICES = {"pump-7": TOKEN, "fan-2": FAN_TOKEN}


class Case:
    """One row of the bad-input matrix: where, the expected answer, and coap-client options."""

    def __init__(
        self, url: str, code: str, pattern: str = "", *, dead: bool = False, **options: Any
    ) -> None:
        self.url = url
        self.code = code
        self.pattern = pattern
        self.dead = dead  # the body was accepted as a dead letter
        self.options = options

    def __repr__(self) -> str:
        return f"Case({self.code} {self.options})"  # not the URL: it holds a token


# --- helpers: aiocoap client on its own loop ------------------------------------------------


def run(coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


@asynccontextmanager
async def served(ingress: Ingress, **kwargs: Any) -> AsyncIterator[tuple[CoapServer, Any, str]]:
    """A started CoapServer, an aiocoap client context and the device API base URI."""
    server = CoapServer("127.0.0.1:0", device_registry(DEVICES), ingress, **kwargs)
    await server.start()
    client = await aiocoap.Context.create_client_context(
        loggername="test.coap-client", transports=["udp6"]
    )
    try:
        yield server, client, f"coap://127.0.0.1:{server.port}/api/v1"
    finally:
        await client.shutdown()
        await server.stop()


async def send(client: Any, message: Message, *, blockwise: bool = False) -> Message:
    request = client.request(message, handle_blockwise=blockwise)
    return await asyncio.wait_for(request.response, REQUEST_TIMEOUT_S)


def post(
    uri: str,
    payload: bytes,
    *,
    block: tuple[int, bool, int] | None = None,
    size1: int | None = None,
    tag: bytes | None = None,
) -> Message:
    message = Message(code=Code.POST, uri=uri, payload=payload)
    if block is not None:
        message.opt.block1 = BlockOption.BlockwiseTuple(*block)
    if size1 is not None:
        message.opt.size1 = size1
    if tag is not None:
        message.opt.request_tag = [tag]
    return message


# --- configuration and binding -------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "match"),
    [
        (5683, r"CoapServer\.listen: must be HOST:PORT, e\.g\. .* \(got 5683\); hint: write it"),
        ("localhost", r"CoapServer\.listen: must be HOST:PORT, .* \(got 'localhost'\); hint: "),
        ("[pump]:5683", r"hint: brackets are only for IPv6 addresses; 'pump' is not one"),
    ],
)
def test_listen_is_checked_at_construction(listen: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CoapServer(listen, device_registry(DEVICES), Ingress())


@pytest.mark.parametrize(
    ("limits", "match"),
    [
        ({"max_transfers": 0}, r"max_transfers must be an int >= 1; got 0; hint"),
        ({"transfer_timeout_s": -1}, r"transfer_timeout_s must be a number > 0; got -1"),
    ],
)
def test_limits_are_checked_at_construction(limits: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CoapServer("127.0.0.1:0", device_registry(DEVICES), Ingress(), **limits)


def test_port_taken_is_a_clear_error_even_by_another_coap_server() -> None:
    async def scenario() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
            squatter.bind(("127.0.0.1", 0))
            port = squatter.getsockname()[1]
            server = CoapServer(f"127.0.0.1:{port}", device_registry(DEVICES), Ingress())
            with pytest.raises(OSError, match=rf"udp 127.0.0.1 port {port} .*already in use"):
                await server.start()
            assert not server.running
        first = CoapServer("127.0.0.1:0", device_registry(DEVICES), Ingress())
        await first.start()
        try:
            # aiocoap binds with SO_REUSEPORT; a second server must still not share the port.
            second = CoapServer(f"127.0.0.1:{first.port}", device_registry(DEVICES), Ingress())
            with pytest.raises(OSError, match=r"the port is already in use; hint: stop the other"):
                await second.start()
            with pytest.raises(RuntimeError, match=r"already started; hint: call stop\(\) first"):
                await first.start()
        finally:
            await first.stop()
        # The port is free again after stop().
        again = CoapServer(f"127.0.0.1:{first.port}", device_registry(DEVICES), Ingress())
        await again.start()
        assert again.running and again.port == first.port
        await again.stop()
        await again.stop()  # idempotent
        assert not again.running

    run(scenario())


def test_other_bind_and_resolution_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        foreign = CoapServer(
            "192.0.2.1:0", device_registry(DEVICES), Ingress()
        )  # TEST-NET-1, not ours
        with pytest.raises(OSError, match=r"udp 192.0.2.1 port 0 .*use an address of this machine"):
            await foreign.start()

        def no_dns(*args: Any, **kwargs: Any) -> Any:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

        with monkeypatch.context() as patch:
            patch.setattr(coap_module.socket, "getaddrinfo", no_dns)
            named = CoapServer("edge.example:5683", device_registry(DEVICES), Ingress())
            with pytest.raises(
                OSError, match=r"cannot resolve host 'edge.example'.*hint: use an IP"
            ):
                await named.start()

        async def lost_race(*args: Any, **kwargs: Any) -> Any:
            raise OSError(errno.EADDRINUSE, "Address already in use")

        with monkeypatch.context() as patch:
            patch.setattr(coap_module.aiocoap.Context, "create_server_context", lost_race)
            raced = CoapServer("127.0.0.1:0", device_registry(DEVICES), Ingress())
            with pytest.raises(OSError, match=r"the port is already in use"):
                await raced.start()
            assert not raced.running

    run(scenario())


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_ipv6_loopback_with_coap_client() -> None:
    ingress = Ingress()

    async def scenario() -> None:
        server = CoapServer("[::1]:0", device_registry(DEVICES), ingress)
        try:
            await server.start()
        except OSError as exc:
            pytest.skip(f"cannot bind ::1: {exc}")
        try:
            url = f"coap://[::1]:{server.port}/api/v1/{TOKEN}/telemetry"
            reply = await asyncio.to_thread(coap_client, url, text='{"temperature": 20.5}')
            assert reply.code == "2.04", reply
        finally:
            await server.stop()

    run(scenario())
    [msg] = ingress.take(10)
    assert (msg.device, msg.channel, msg.transport, msg.payload) == (
        "pump-7",
        "telemetry",
        "coap",
        b'{"temperature": 20.5}',
    )


# --- end to end: coap-client -> CoapServer -> DeviceServers -> flow -> Parquet --------------


def start_flow(
    tmp_path: Path, module: Any, ingress: Ingress, run_flow: Any, wait_for: Any, **section: Any
) -> tuple[CoapServer, threading.Event, Any, Meter]:
    config = parse_config({"data_dir": str(tmp_path), **section})
    server = CoapServer("127.0.0.1:0", device_registry(DEVICES), ingress)
    stop = threading.Event()
    source = DeviceServers(ingress, [server], stop=stop)
    edge = edge_for(
        module.build, config, source=source, stop=stop, name=module.__name__.rsplit(".", 1)[-1]
    )
    meter = edge.meter
    runner = run_flow(edge.dataflow(), stops=[stop])
    wait_for(lambda: server.running or not runner.alive, "the CoAP server to start")
    assert runner.alive
    return server, stop, runner, meter


def test_telemetry_end_to_end_with_bad_input_matrix(
    tmp_path: Path, run_flow: Any, wait_for: Any
) -> None:
    ingress = Ingress()
    section = {"telemetry": {"deadband": {"absolute": 0.5, "max_silence": None}}}
    server, stop, runner, _ = start_flow(
        tmp_path, telemetry, ingress, run_flow, wait_for, **section
    )
    base = f"coap://127.0.0.1:{server.port}/api/v1"
    pump, fan = f"{base}/{TOKEN}/telemetry", f"{base}/{FAN_TOKEN}/telemetry"
    ts = ms(T0)

    stranger = f"{base}/{STRANGER}/telemetry"
    reading = f'{{"ts": {ts}, "values": {{"humidity": 40}}}}'
    one = '{"t": 1}'
    matrix = [
        Case(pump, "2.04", text='{"temperature": 21.5}'),
        Case(pump, "2.04", text=reading, non=True),
        Case(pump, "4.00", r"^telemetry: not valid JSON \(", dead=True, text="{bad"),
        Case(fan, "4.00", r"'pressure'", dead=True, text='{"pressure": [1, NaN]}'),
        Case(fan, "2.04", text="{}"),  # how ThingsBoard's clients test the connection
        Case(f"{base}/{TOKEN}/attributes", "2.04", text='{"fw": "1.4.2", "on": true}'),
        Case(f"{base}/{FAN_TOKEN}/attributes", "4.00", r"^attributes: value of 'x' is null; ",
             dead=True, text='{"x": null}'),
        Case(pump, "4.00", r"NaN", dead=True, text='{"temperature": NaN}'),
        Case(fan, "2.04", text='{"pressure": 1.5}', non=True),
        Case(stranger, "4.01", r"^unknown access token; check the token", text=one),
        Case(pump, "4.05", r"^method GET is not allowed; devices POST to", method="get"),
        Case(pump, "4.05", r"^method PUT is not allowed", method="put", text=one),
        Case(f"{base}/{TOKEN}/alarms", "4.04", r"^no such resource; devices POST", text=one),
        Case(f"{base}/{TOKEN}", "4.04", r"^no such resource", text=one),
        Case(f"{base}/{TOKEN}/telemetry/x", "4.04", r"^no such resource", text=one),
        Case(f"{base[:-2]}v2/{TOKEN}/telemetry", "4.04", r"^no such resource", text=one),
        Case(pump, "4.00", r"^telemetry: payload is empty; POST a JSON document"),
        Case(pump, "2.04", text='{"temperature": 30.0}'),
    ]
    dead_expected: list[tuple[str, str, bytes]] = []
    for case in matrix:
        reply = coap_client(case.url, **case.options)
        assert reply.code == case.code, (case, reply)
        if case.code == "2.04":
            assert reply.diagnostic == ""
        else:
            assert re.search(case.pattern, reply.diagnostic), (case, reply)
            assert TOKEN not in reply.diagnostic and STRANGER not in reply.diagnostic
        if case.options.get("non"):
            assert " t:NON " in reply.line  # a non-confirmable request gets a NON response
        if case.dead:
            device = "fan-2" if FAN_TOKEN in case.url else "pump-7"
            dead_expected.append((device, reply.diagnostic, case.options["text"].encode()))

    wait_for(lambda: ingress.accepted + ingress.rejected == 10 and len(ingress) == 0, "the flow")
    stop.set()
    runner.join()

    points = query_parquet(
        tmp_path, "telemetry_points", "select device, key, value, transport from {src} order by ts"
    )
    assert sorted(points) == [
        ("fan-2", "pressure", 1.5, "coap"),
        ("pump-7", "humidity", 40.0, "coap"),
        ("pump-7", "temperature", 21.5, "coap"),
        ("pump-7", "temperature", 30.0, "coap"),
    ]
    dead = query_parquet(
        tmp_path, "dead_letters", "select device, transport, reason, payload from {src}"
    )
    assert sorted((d, r, p) for d, t, r, p in dead) == sorted(dead_expected)
    assert {t for _, t, _, _ in dead} == {"coap"}
    assert (ingress.accepted, ingress.rejected, ingress.refused) == (6, 4, 0)
    attributes = query_parquet(
        tmp_path, "device_attributes", "select device, key, value, source from {src} order by key"
    )
    assert attributes == [("pump-7", "fw", '"1.4.2"', "coap"), ("pump-7", "on", "true", "coap")]


def test_vibration_blockwise_end_to_end(tmp_path: Path, run_flow: Any, wait_for: Any) -> None:
    limit = 16 * 1024
    ingress = Ingress(max_payload_bytes=limit)
    section = {"vibration": {"fft_size": 1024, "frames_per_row": 1}}
    server, stop, runner, _ = start_flow(
        tmp_path, vibration, ingress, run_flow, wait_for, **section
    )
    url = f"coap://127.0.0.1:{server.port}/api/v1/{TOKEN}/vibration"
    machine = Machine("healthy", seed=3)
    good = blocks(machine, device="pump-7", block_frames=1024, count=3, start_ts=T0)
    assert all(12_000 < len(b) < limit for b in good)
    big = blocks(machine, device="pump-7", block_frames=2048, count=1, start_ts=T0)[0]
    files = {}
    for name, data in {
        "good0": good[0],
        "good1": good[1],
        "good2": good[2],
        "truncated": good[0][:-5],
        "magic": b"EVBX" + good[0][4:],
        "big": big,
    }.items():
        files[name] = tmp_path / f"{name}.bin"
        files[name].write_bytes(data)

    reply = coap_client(url, file=files["good0"], block=1024)
    assert reply.code == "2.04", reply
    assert reply.codes.count("2.31") == len(good[0]) // 1024  # every block but the last continued
    assert coap_client(url, file=files["good1"], block=512).code == "2.04"
    assert coap_client(url, file=files["good2"], block=1024, non=True).code == "2.04"

    truncated = coap_client(url, file=files["truncated"], block=1024)
    assert truncated.code == "4.00"
    assert re.match(
        r"vibration: truncated block: 12283 sample bytes is not a multiple of 12",
        truncated.diagnostic,
    ), truncated
    magic = coap_client(url, file=files["magic"], block=256)
    assert magic.code == "4.00"
    assert re.match(r"vibration: bad magic b'EVBX', expected b'EVB1'", magic.diagnostic), magic
    oversized = coap_client(url, file=files["big"], block=1024)
    assert oversized.code == "4.13", oversized
    assert f"Size1:{limit}" in oversized.line
    assert re.fullmatch(
        rf"vibration: body of {len(big)} bytes announced \(Size1\) is over the {limit}-byte "
        "limit; split it into smaller messages",
        oversized.diagnostic,
    )
    assert server.pending_transfers == 0

    wait_for(lambda: ingress.accepted == 3 and len(ingress) == 0, "the flow to take the blocks")
    stop.set()
    runner.join()

    rows = query_parquet(
        tmp_path,
        "vibration_features",
        "select device, axis, transport, count(*), max(frames) from {src} group by all order by axis",
    )
    assert rows == [("pump-7", axis, "coap", 3, 1) for axis in "xyz"]  # one FFT frame per block
    dead = query_parquet(
        tmp_path, "dead_letters", "select device, transport, reason, payload from {src}"
    )
    assert sorted((r, p) for _, _, r, p in dead) == sorted(
        [
            (truncated.diagnostic, good[0][:-5]),
            (magic.diagnostic, b"EVBX" + good[0][4:]),
        ]
    )
    assert {(d, t) for d, t, _, _ in dead} == {("pump-7", "coap")}
    assert (ingress.accepted, ingress.rejected, ingress.refused) == (3, 2, 0)


# --- block-wise details, limits and overload (aiocoap client, exact codes and options) -----


def test_blockwise_limit_enforced_without_size1_and_incomplete_transfers() -> None:
    limit = 4096
    ingress = Ingress(max_payload_bytes=limit)

    async def scenario() -> None:
        async with served(ingress) as (server, client, base):
            uri = f"{base}/{TOKEN}/vibration"
            chunk = b"\x00" * 1024
            for number in range(4):  # 4 KiB: exactly at the limit so far
                reply = await send(client, post(uri, chunk, block=(number, True, 6)))
                assert reply.code == Code.CONTINUE
                assert tuple(reply.opt.block1) == (number, True, 6)
            assert server.pending_transfers == 1
            over = await send(client, post(uri, chunk, block=(4, True, 6)))
            assert over.code == Code.REQUEST_ENTITY_TOO_LARGE
            assert over.opt.size1 == limit
            assert over.payload.decode() == (
                "vibration: body of 5120 bytes reached at block 4 is over the 4096-byte limit; "
                "split it into smaller messages"
            )
            assert server.pending_transfers == 0  # the partial body is dropped at once

            late = await send(client, post(uri, chunk, block=(2, False, 6)))
            assert late.code == Code.REQUEST_ENTITY_INCOMPLETE
            assert late.payload.decode() == (
                "vibration: block 2 arrived without the earlier blocks of its transfer "
                "(or after it timed out); restart from block 0"
            )
            assert (await send(client, post(uri, chunk, block=(0, True, 6)))).code == Code.CONTINUE
            gap = await send(client, post(uri, chunk, block=(2, True, 6)))
            assert gap.code == Code.REQUEST_ENTITY_INCOMPLETE
            assert gap.payload.decode() == (
                "vibration: block 2 starts at byte 2048 but 1024 bytes have arrived; "
                "restart from block 0"
            )
            short = await send(client, post(uri, b"\x00" * 100, block=(0, True, 6)))
            assert short.code == Code.BAD_REQUEST
            assert short.payload.decode() == (
                "vibration: block 0 carries 100 bytes but Block1 announces 1024-byte blocks; "
                "every block but the last must be full"
            )
            bert = await send(client, post(uri, chunk, block=(0, True, 7)))
            assert bert.code == Code.BAD_REQUEST
            assert "Block1 size exponent 7 (BERT) is only defined for CoAP over TCP" in (
                bert.payload.decode()
            )
            announced = await send(client, post(uri, chunk, block=(0, True, 6), size1=limit + 1))
            assert announced.code == Code.REQUEST_ENTITY_TOO_LARGE
            assert announced.opt.size1 == limit
            assert b"4097 bytes announced (Size1)" in announced.payload
            assert server.pending_transfers == 0

    run(scenario())
    assert len(ingress) == 0 and ingress.accepted == ingress.rejected == 0


def test_single_datagram_over_limit_gets_ingress_reason() -> None:
    ingress = Ingress(max_payload_bytes=1000)

    async def scenario() -> None:
        async with served(ingress) as (_, client, base):
            reply = await send(client, post(f"{base}/{TOKEN}/telemetry", b"1" * 1200))
            assert reply.code == Code.REQUEST_ENTITY_TOO_LARGE
            assert reply.opt.size1 == 1000
            assert reply.payload.decode() == (
                "payload of 1200 bytes is over the 1000-byte limit; split it into smaller messages"
            )

    run(scenario())
    assert ingress.refused == 1 and len(ingress) == 0


def test_spool_holds_at_most_max_transfers_and_expires_abandoned_ones() -> None:
    ingress = Ingress(retry_after_s=3)

    async def scenario() -> None:
        async with served(
            ingress, max_transfers=1, max_device_transfers=1, transfer_timeout_s=0.3
        ) as (
            server,
            client,
            base,
        ):
            uri = f"{base}/{TOKEN}/vibration"
            first, second = b"A" * 512, b"B" * 512
            assert (await send(client, post(uri, first, block=(0, True, 5), tag=b"a"))).code == (
                Code.CONTINUE
            )
            busy = await send(client, post(uri, second, block=(0, True, 5), tag=b"b"))
            assert busy.code == Code.SERVICE_UNAVAILABLE
            assert busy.opt.max_age == 3
            assert busy.payload.decode() == (
                "edge is busy: 1 block-wise uploads in progress, the most it holds; retry in 3s"
            )
            await asyncio.sleep(0.45)
            # The abandoned transfer "a" expires; "b" may start and finish.
            assert (await send(client, post(uri, second, block=(0, True, 5), tag=b"b"))).code == (
                Code.CONTINUE
            )
            stale = await send(client, post(uri, first, block=(1, False, 5), tag=b"a"))
            assert stale.code == Code.REQUEST_ENTITY_INCOMPLETE
            done = await send(client, post(uri, b"tail", block=(1, False, 5), tag=b"b"))
            assert done.code == Code.BAD_REQUEST  # reassembled, then decoded: not an EVB1 block
            assert tuple(done.opt.block1) == (1, False, 5)
            assert done.payload.startswith(b"vibration: ")
            assert server.pending_transfers == 0

    run(scenario())
    [msg] = ingress.take(10)
    assert msg.payload == b"B" * 512 + b"tail"  # the reassembled body reached the ingress


def test_aiocoap_client_blockwise_upload_is_reassembled() -> None:
    ingress = Ingress()
    body = blocks(
        Machine("bearing", seed=1), device="pump-7", block_frames=512, count=1, start_ts=T0
    )
    payload = body[0]

    async def scenario() -> None:
        async with served(ingress) as (_, client, base):
            message = post(f"{base}/{TOKEN}/vibration", payload)
            reply = await send(client, message, blockwise=True)  # aiocoap splits it into blocks
            assert reply.code == Code.CHANGED, reply.payload

    run(scenario())
    [msg] = ingress.take(10)
    assert msg.payload == payload and len(payload) > 1024
    assert msg.decoded is not None and msg.decoded.frames == 512  # type: ignore[union-attr]


def test_overload_answers_503_with_max_age_and_stays_bounded() -> None:
    ingress = Ingress(max_messages=5, retry_after_s=7)

    async def scenario() -> list[Message]:
        async with served(ingress) as (server, client, base):
            uri = f"{base}/{TOKEN}/telemetry"
            replies: list[Message] = []
            for wave in range(10):  # 100 requests, 10 in flight at a time
                batch = [send(client, post(uri, b'{"n": %d}' % (wave * 10 + i))) for i in range(10)]
                replies += await asyncio.gather(*batch)
            blockwise = await send(
                client, post(f"{base}/{TOKEN}/vibration", b"\x00" * 256, block=(0, True, 4))
            )
            assert blockwise.code == Code.SERVICE_UNAVAILABLE  # refused before spooling anything
            assert blockwise.opt.max_age == 7
            assert server.pending_transfers == 0
            return replies

    replies = run(scenario())
    codes = [r.code for r in replies]
    assert codes.count(Code.CHANGED) == 5
    assert codes.count(Code.SERVICE_UNAVAILABLE) == 95
    for reply in replies:
        if reply.code == Code.SERVICE_UNAVAILABLE:
            assert reply.opt.max_age == 7
            assert reply.payload == b"edge is busy; retry in 7s"
    assert ingress.high_water <= 5 and len(ingress) == 5
    assert ingress.refused == 96  # the block-wise one too, refused before spooling


# --- tokens stay out of logs ----------------------------------------------------------------


def test_tokens_never_appear_in_logs(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger=WIRE_LOGGER)  # even with aiocoap's chatter on
    ingress = Ingress(max_payload_bytes=2048)
    block = tmp_path / "block.bin"
    block.write_bytes(b"EVB1" + bytes(3000))

    async def scenario() -> None:
        server = CoapServer("127.0.0.1:0", device_registry(DEVICES), ingress)
        await server.start()
        base = f"coap://127.0.0.1:{server.port}/api/v1"
        try:
            calls = [
                (f"{base}/{TOKEN}/telemetry", {"text": '{"t": 1}'}),
                (f"{base}/{TOKEN}/telemetry", {"text": "{bad"}),
                (f"{base}/{STRANGER}/telemetry", {"text": '{"t": 1}'}),
                (f"{base}/{TOKEN}/nowhere", {"text": "x"}),
                (f"{base}/{TOKEN}/telemetry", {"method": "get"}),
                (f"{base}/{FAN_TOKEN}/vibration", {"file": block, "block": 512}),
            ]
            for url, options in calls:
                await asyncio.to_thread(coap_client, url, **options)
        finally:
            await server.stop()

    run(scenario())
    wire = logging.getLogger(WIRE_LOGGER)
    wire.debug("request for coap://127.0.0.1/api/v1/%s/telemetry", TOKEN)
    wire.warning("options ('api', 'v1', '%s', 'telemetry')", STRANGER)

    records = caplog.records
    assert any(r.name == WIRE_LOGGER and r.levelno == logging.DEBUG for r in records)
    assert any(
        r.name == "edgesieve.coap" and r.getMessage().startswith("coap: unknown access token on ")
        for r in records
    )
    text = caplog.text + "\n".join(r.getMessage() for r in records)
    for secret in (TOKEN, FAN_TOKEN, STRANGER):
        assert secret not in text
    assert "api/v1/***/telemetry" in text and "'api', 'v1', '***'" in text


def test_wire_logger_defaults_to_warning() -> None:
    wire = logging.getLogger(WIRE_LOGGER)
    saved = wire.level
    wire.setLevel(logging.NOTSET)
    try:

        async def scenario() -> None:
            server = CoapServer("127.0.0.1:0", device_registry(DEVICES), Ingress())
            await server.start()
            await server.stop()

        run(scenario())
        assert wire.level == logging.WARNING
    finally:
        wire.setLevel(saved)


# --- journal mode: a slow commit gets aiocoap's separate response --------------------------------


def test_a_commit_slower_than_the_ack_delay_gets_an_empty_ack_then_a_separate_204(
    tmp_path: Path,
) -> None:
    import concurrent.futures

    from connectors.devices.journal import Journal, JournalReader, JournalSettings

    journal = Journal(JournalSettings(root=tmp_path / "journal", partitions=1))

    class SlowDisk:
        """The journal, with each commit reported 0.5 s late."""

        def admit(self, device: str | None = None) -> str | None:
            return journal.admit(device)

        def submit(self, msg: Any, *, redelivery: bool = False, dedup_key: Any = None) -> Any:
            late: concurrent.futures.Future[Any] = concurrent.futures.Future()
            done = journal.submit(msg, redelivery=redelivery)
            done.add_done_callback(lambda f: (time.sleep(0.5), late.set_result(f.result())))
            return late

        def append(
            self, msg: Any, done: Any, token: Any = None, *, redelivery: bool = False,
            dedup_key: Any = None,
        ) -> bool:
            late = self.submit(msg, redelivery=redelivery, dedup_key=dedup_key)
            late.add_done_callback(lambda f: done([token], [f.exception() or f.result()]))
            return True

    ingress = Ingress(journal=SlowDisk())  # type: ignore[arg-type]
    server = CoapServer("127.0.0.1:0", device_registry(DEVICES), ingress)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
        url = f"coap://127.0.0.1:{server.port}/api/v1/{TOKEN}/telemetry"
        reply = coap_client(url, text='{"t": 1}')
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        journal.close()
    # aiocoap sent an empty ACK after 0.1 s, then 2.04 as a separate confirmable response
    # that coap-client acknowledged with an empty ACK, the last line it printed (a
    # piggy-backed 2.04 would be the last one)
    assert [c for c in reply.codes if c != "0.00"] == ["2.04"], reply.codes
    assert reply.line.startswith("v:1 t:ACK c:0.00 "), reply.line
    with JournalReader(tmp_path / "journal", 0) as reader:
        assert [m.payload for _, m in reader.read(-1, 10)] == [b'{"t": 1}']


# --- fairness: one device cannot hold the spool or the journal for the others ------------------


def _vibration_file(tmp_path: Path, device: str) -> tuple[Path, bytes]:
    body = blocks(Machine("healthy", seed=5), device=device, block_frames=256, count=1, start_ts=T0)
    path = tmp_path / f"{device}.bin"
    path.write_bytes(body[0])
    return path, body[0]


def test_one_device_holding_uploads_open_leaves_the_spool_to_the_others(tmp_path: Path) -> None:
    # The probe: one device opens 16 block-wise uploads and never finishes them.
    ingress = Ingress(retry_after_s=2)
    fan_file, fan_body = _vibration_file(tmp_path, "fan-2")

    async def scenario() -> None:
        async with served(ingress, max_transfers=4, max_device_transfers=2) as (
            server,
            client,
            base,
        ):
            uri = f"{base}/{TOKEN}/vibration"
            replies = [
                await send(client, post(uri, b"\x00" * 64, block=(0, True, 2), tag=b"t%d" % i))
                for i in range(16)
            ]
            assert [r.code for r in replies[:2]] == [Code.CONTINUE] * 2
            for busy in replies[2:]:
                assert busy.code == Code.SERVICE_UNAVAILABLE
                assert busy.opt.max_age == 2
                assert busy.payload.decode() == (
                    "vibration: device pump-7 has 2 block-wise uploads in progress, the most one "
                    "device may hold (transports.coap.max_device_transfers); finish one or let it "
                    "expire, retry in 2s"
                )
            assert server.pending_transfers == 2
            # another device uploads block-wise, with libcoap's client and with aiocoap's
            fan_url = f"{base}/{FAN_TOKEN}/vibration"
            reply = await asyncio.to_thread(coap_client, fan_url, file=fan_file, block=256)
            assert reply.code == "2.04", reply
            assert reply.codes.count("2.31") == len(fan_body) // 256
            aio = await send(client, post(fan_url, fan_body), blockwise=True)
            assert aio.code == Code.CHANGED, aio.payload
            assert server.pending_transfers == 2  # pump-7's, still held for it

    run(scenario())
    assert ingress.refused == 14  # counted (the ingest metrics' refusals)
    taken = ingress.take(10)
    assert [(m.device, m.payload) for m in taken] == [("fan-2", fan_body)] * 2


def test_a_transfer_expires_on_a_deadline_from_its_first_block_however_steadily_blocks_come() -> (
    None
):
    ingress = Ingress()

    async def scenario() -> None:
        async with served(
            ingress, max_device_transfers=1, transfer_timeout_s=30, transfer_deadline_s=0.6
        ) as (server, client, base):
            uri = f"{base}/{TOKEN}/vibration"
            chunk = b"\x00" * 64
            number = 0
            started = time.monotonic()
            reply = await send(client, post(uri, chunk, block=(0, True, 2), tag=b"slow"))
            while reply.code == Code.CONTINUE:  # a block every 0.2 s: never idle for 30 s
                assert number < 10, "the deadline never struck"
                await asyncio.sleep(0.2)
                number += 1
                reply = await send(client, post(uri, chunk, block=(number, True, 2), tag=b"slow"))
            assert reply.code == Code.REQUEST_ENTITY_INCOMPLETE
            assert time.monotonic() - started >= 0.6 and number >= 2
            assert reply.payload.decode() == (
                f"vibration: block {number} arrived after the 0.6s a block-wise upload may take "
                "from its first block (transports.coap.transfer_deadline); restart from block 0 "
                "with larger blocks or a smaller body"
            )
            assert server.pending_transfers == 0
            # an abandoned one gives its slot back at its deadline, without any later block
            first = await send(client, post(uri, chunk, block=(0, True, 2), tag=b"gone"))
            assert first.code == Code.CONTINUE
            held = await send(client, post(uri, chunk, block=(0, True, 2), tag=b"next"))
            assert held.code == Code.SERVICE_UNAVAILABLE  # its one upload is held
            await asyncio.sleep(0.7)
            fresh = await send(client, post(uri, chunk, block=(0, True, 2), tag=b"next"))
            assert fresh.code == Code.CONTINUE
            assert server.pending_transfers == 1

    run(scenario())


def test_a_device_over_its_journal_share_gets_503_while_others_are_accepted(
    tmp_path: Path,
) -> None:
    from connectors.devices.journal import Journal, JournalSettings

    journal = Journal(
        JournalSettings(root=tmp_path / "journal", partitions=1, max_bytes=40_000, device_share=0.25)
    )
    ingress = Ingress(journal=journal, retry_after_s=4)
    fan_file, _ = _vibration_file(tmp_path, "fan-2")
    big = journal.settings.max_bytes

    async def scenario() -> None:
        async with served(ingress) as (server, client, base):
            uri = f"{base}/{TOKEN}/telemetry"
            codes = []
            for i in range(12):  # 1000 bytes each, nobody releases: its share is 10000 bytes
                body = b'{"n": %d}' % i
                reply = await send(client, post(uri, body.ljust(1000)))
                codes.append(reply.code)
            assert codes == [Code.CHANGED] * 10 + [Code.SERVICE_UNAVAILABLE] * 2
            assert reply.opt.max_age == 4
            assert reply.payload.decode() == (
                f"edge is busy: journal share of device pump-7 full: 10000 payload bytes held of "
                f"its 10000 (journal.device_share=0.25 x journal.max_bytes={big}) in "
                f"{tmp_path / 'journal'} (got a 0-byte message); hint: this device sends faster "
                "than the flow takes its messages, other devices are still accepted; retry later "
                "or raise journal.device_share; retry in 4s"
            )
            blockwise = await send(
                client, post(f"{base}/{TOKEN}/vibration", b"\x00" * 64, block=(0, True, 2))
            )
            assert blockwise.code == Code.SERVICE_UNAVAILABLE  # nothing spooled for it
            assert server.pending_transfers == 0
            fan = f"{base}/{FAN_TOKEN}"
            assert (await send(client, post(f"{fan}/telemetry", b'{"t": 1}'))).code == Code.CHANGED
            reply = await asyncio.to_thread(coap_client, f"{fan}/vibration", file=fan_file, block=256)
            assert reply.code == "2.04", reply

    try:
        run(scenario())
    finally:
        journal.close()
    assert (ingress.accepted, ingress.refused) == (12, 3)  # pushed back before the journal
