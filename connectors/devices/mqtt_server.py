"""The edge's own MQTT endpoint with ThingsBoard's device and gateway semantics.

Firmware and SDKs written for ThingsBoard connect with username = the
device's access token (the password is ignored) and publish::

    v1/devices/me/telemetry     telemetry JSON           -> channel "telemetry"
    v1/devices/me/attributes    attributes JSON          -> channel "attributes"
    v1/devices/me/logs          log lines (text or JSON) -> channel "logs"

A gateway (a registry entry with ``gateway: {devices: [patterns]}``) also
publishes ``v1/gateway/connect``, ``v1/gateway/disconnect``,
``v1/gateway/telemetry`` and ``v1/gateway/attributes``; each device's part is
journaled as a message of that device (:mod:`connectors.devices.mqtt_gateway`).

Answers and rules:

- MQTT 3.1.1 and 5 (ThingsBoard's Python SDK speaks 5). CONNECT with an
  unknown token (or none): CONNACK 4 / 0x86 (bad user name or password); an
  MQTT version other than those: CONNACK 1; an empty client id with ``clean
  session`` off (3.1.1): CONNACK 2; more than ``max_connections`` in all or
  ``max_device_connections`` for one token: CONNACK 3 / 0x88 (server
  unavailable). MQTT 5's CONNACK carries Receive Maximum (``max_inflight``),
  Maximum QoS 1 and Maximum Packet Size; MQTT 5 properties the clients send
  are read past and not used.
  A new connection with a client id in use closes the old one (MQTT 3.1.1 §3.1.4).
- PUBLISH QoS 1 is acknowledged (PUBACK) only after its message is committed
  to the ingest journal, in the order the PUBLISHes came. QoS 0 is journaled
  the same way, without an answer. A PUBLISH sent again with DUP set is stored
  once when the journal holds it already. QoS 2 is not supported: the connection is
  closed (MQTT 3.1.1 has no way to refuse one message).
- Every data message is kept: a malformed payload is journaled and becomes a
  dead letter in the flow (it is acknowledged, as HTTP answers 400 after
  keeping it); so is a publish to a topic outside the API, a gateway topic
  from a device that is no gateway, and a gateway's part for a device name it
  may not speak for (the rest of the gateway's message is kept as usual).
  Those are journaled on a ``refused: <reason>`` channel that decodes to a
  dead letter with the reason.
- When the journal pushes back the server stops reading from the device's
  connection (TCP backpressure) and retries; a message is never acknowledged
  before its commit and never dropped once acknowledged. One connection has
  at most ``max_inflight`` messages waiting for their commit.
- A packet larger than ``max_payload_bytes`` plus its topic closes the
  connection before its body is read (as ThingsBoard does).
- Keepalive: a connection silent for 1.5 times its keepalive is closed.
- Subscriptions, RPC and attribute requests: see
  :mod:`connectors.devices.mqtt_device_api`.

The MQTT codec is this module's own (MQTT 3.1.1 and 5, the part a device
server needs): the maintained Python brokers (amqtt) acknowledge a QoS 1 PUBLISH in
their own protocol handler before a plugin could commit it, which breaks
"accepted means kept".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import struct
from collections import Counter
from typing import Final

from connectors.codecs.decode import refused_channel
from connectors.common.address import parse_host_port
from connectors.devices.ingress import Ingress, Verdict
from connectors.devices.keepalive import Keepalive
from connectors.devices.mqtt_device_api import (
    API_HINT,
    ATTRIBUTES_REQUEST,
    ATTRIBUTES_RESPONSE,
    REFUSED,
    RPC_REQUEST,
    RPC_RESPONSE,
    TOPIC_CHANNELS,
    granted_qos,
    rpc_answer,
)
from connectors.devices.mqtt_gateway import GATEWAY, route
from connectors.devices.mqtt_wire import (
    ACCEPTED,
    BAD_CLIENT_ID,
    BAD_CREDENTIALS,
    BAD_VERSION,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PUBLISH,
    SUBSCRIBE,
    UNAVAILABLE,
    UNSUBSCRIBE,
    Closed,
    connack,
    parse_connect,
    puback,
    publish_qos0,
    read_packet,
    read_string,
    skip_properties,
    suback,
    subscription_filters,
    unsuback,
)
from connectors.devices.registry import Device, DeviceRegistry

__all__ = ["MqttServer"]

logger = logging.getLogger("edgesieve.mqtt_server")

TRANSPORT: Final = "mqtt_server"
DEFAULT_MAX_INFLIGHT: Final = 16
DEFAULT_MAX_CONNECTIONS: Final = 1024
DEFAULT_MAX_DEVICE_CONNECTIONS: Final = 4
CONNECT_TIMEOUT_S: Final = 10.0
"""A connection that sends no CONNECT within this long is closed."""
KEEPALIVE_FACTOR: Final = 1.5
SHUTDOWN_TIMEOUT_S: Final = 5.0
"""On stop, how long a connection's messages waiting for their commit may take to be acked."""
_RETRY_MIN_S: Final = 0.05
_RETRY_MAX_S: Final = 1.0
_TOPIC_HEADROOM: Final = 64 * 1024
"""Bytes a PUBLISH may carry besides its payload (topic, packet id)."""


class MqttServer:
    """ThingsBoard's MQTT device and gateway API on ``listen``, journaling through ``ingress``.

    Implements :class:`connectors.devices.ingress.DeviceServer`. ``listen`` is
    ``"HOST:PORT"`` (port 0 for an ephemeral port, read back from
    :attr:`port`). See the module docstring for the protocol.
    """

    name = "mqtt_server"

    def __init__(
        self,
        listen: str,
        registry: DeviceRegistry,
        ingress: Ingress,
        *,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_device_connections: int = DEFAULT_MAX_DEVICE_CONNECTIONS,
    ) -> None:
        self._host, self._port = parse_host_port(listen, key="MqttServer.listen")
        for key, value in (
            ("max_inflight", max_inflight),
            ("max_connections", max_connections),
            ("max_device_connections", max_device_connections),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"MqttServer: {key} must be a positive integer (got {value!r})"
                raise ValueError(msg)
        self.listen = listen
        self.max_inflight = max_inflight
        self.max_connections = max_connections
        self.max_device_connections = max_device_connections
        self._registry = registry
        self._ingress = ingress
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._by_client_id: dict[str, _Connection] = {}
        self._per_device: Counter[str] = Counter()
        self.refused_connections = 0
        self.keepalive_timeouts = 0

    def __repr__(self) -> str:
        return f"MqttServer({self.listen!r})"

    @property
    def running(self) -> bool:
        """Whether the server is bound and answering."""
        return self._server is not None

    @property
    def port(self) -> int:
        """The bound TCP port (the real one when ``listen`` asked for port 0)."""
        if self._server is None:
            msg = f"MqttServer({self.listen!r}).port: not started yet; await start() first"
            raise RuntimeError(msg)
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def connections(self) -> int:
        """Devices and gateways connected now."""
        return sum(self._per_device.values())

    async def start(self) -> None:
        """Bind ``listen`` and serve; raise OSError naming the address if it cannot be used."""
        if self._server is not None:
            msg = f"MqttServer({self.listen!r}).start: already started; stop() it first"
            raise RuntimeError(msg)
        try:
            self._server = await asyncio.start_server(self._accept, self._host, self._port)
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            msg = (
                f"MqttServer: cannot listen on {self.listen!r}: {why}; hint: "
                f"another process may hold port {self._port} (pick another, or 0 for an "
                f"ephemeral port), or {self._host!r} is not an address of this machine"
            )
            raise OSError(exc.errno, msg) from exc
        logger.info("mqtt_server: ThingsBoard MQTT API listening on %s:%d", self._host, self.port)

    async def stop(self) -> None:
        """Stop accepting; each connection stops reading, gets its pending PUBACKs, and closes."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for conn in list(self._by_client_id.values()):
            conn.stopping = True
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()
        logger.info("mqtt_server on %s stopped", self.listen)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        conn = _Connection(self, reader, writer)
        try:
            await conn.run()
        except asyncio.CancelledError:
            await conn.finish(SHUTDOWN_TIMEOUT_S)
        finally:
            self._handlers.discard(task)
            with contextlib.suppress(Exception):
                writer.close()


class _Connection:
    """One device's (or gateway's) MQTT connection."""

    def __init__(
        self, server: MqttServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.device: Device | None = None
        self.client_id = ""
        self.stopping = False
        self.pending: asyncio.Queue[asyncio.Task[int | None] | None] = asyncio.Queue()
        self.slots = asyncio.Semaphore(server.max_inflight)
        """Messages waiting for their commit and PUBACK; reading waits when none is free."""
        self.acker: asyncio.Task[None] | None = None
        self._forgotten = False
        self.v5 = False
        self.peer = writer.get_extra_info("peername")
        self.max_packet = server._ingress.max_payload_bytes + _TOPIC_HEADROOM

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            keepalive = await self._connect()
        except (Closed, asyncio.IncompleteReadError, ConnectionError, TimeoutError) as exc:
            logger.info("mqtt_server: connection from %s refused: %s", self.peer, _why(exc))
            return
        assert self.device is not None
        device = self.device.id
        self.acker = asyncio.create_task(self._ack_in_order())
        reason = "closed by the device"
        try:
            await self._serve(keepalive)
            reason = "DISCONNECT"
        except Closed as exc:
            reason = str(exc)
        except (struct.error, IndexError):
            reason = "malformed packet"
        except asyncio.IncompleteReadError:
            reason = "closed by the device"
        except ConnectionError as exc:
            reason = f"connection lost ({type(exc).__name__})"
        finally:
            self._forget()
        logger.info(
            "mqtt_server: %s (client id %r) disconnected: %s", device, self.client_id, reason
        )
        await self.finish(SHUTDOWN_TIMEOUT_S if reason == "DISCONNECT" else 0.0)

    async def finish(self, timeout: float) -> None:
        """Let the messages waiting for their commit be acked (up to ``timeout``), then close."""
        self._forget()
        acker = self.acker
        if acker is None:
            return
        self.acker = None
        self.pending.put_nowait(None)
        if timeout > 0 and not acker.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(acker), timeout)
        acker.cancel()
        while not self.pending.empty():
            task = self.pending.get_nowait()
            if task is not None:
                task.cancel()  # a retry stops; a journal write in progress still completes
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await acker

    def _forget(self) -> None:
        server = self.server
        if server._by_client_id.get(self.client_id) is self:
            del server._by_client_id[self.client_id]
        if self.device is not None and not self._forgotten:
            self._forgotten = True
            server._per_device[self.device.id] -= 1
            if server._per_device[self.device.id] <= 0:
                del server._per_device[self.device.id]

    async def _connect(self) -> float:
        """Read CONNECT, authenticate, answer CONNACK; the keepalive timeout (0: none)."""
        kind, _, body = await asyncio.wait_for(
            read_packet(self.reader, self.max_packet), CONNECT_TIMEOUT_S
        )
        if kind != CONNECT:
            msg = f"the first packet was type {kind}, not CONNECT"
            raise Closed(msg)
        try:
            return self._login(body)
        except (struct.error, IndexError):
            msg = "malformed CONNECT"
            raise Closed(msg) from None

    def _login(self, body: bytes) -> float:
        connect = parse_connect(body)
        if connect.protocol != "MQTT" or connect.level not in (4, 5):
            self._send(bytes((0x20, 2, 0, BAD_VERSION)))
            msg = (
                f"protocol {connect.protocol!r} level {connect.level}; "
                "only MQTT 3.1.1 and 5 are served"
            )
            raise Closed(msg)
        self.v5 = connect.v5
        client_id, token = connect.client_id, connect.username
        server = self.server
        device = server._registry.lookup(token) if token else None
        if device is None:
            server.refused_connections += 1
            self._connack(BAD_CREDENTIALS)
            msg = (
                "unknown access token (CONNACK 4); set the MQTT username to the device's "
                "token from devices.yaml"
            )
            raise Closed(msg)
        if not client_id and not connect.clean and not self.v5:
            self._connack(BAD_CLIENT_ID)
            msg = f"{device.id}: an empty client id needs clean session (CONNACK 2)"
            raise Closed(msg)
        total = sum(server._per_device.values())
        if (
            total >= server.max_connections
            or server._per_device[device.id] >= server.max_device_connections
        ):
            server.refused_connections += 1
            self._connack(UNAVAILABLE)
            msg = (
                f"{device.id}: too many connections ({server._per_device[device.id]} of this "
                f"token, {total} in all; transports.mqtt_server.max_device_connections / "
                "max_connections) (CONNACK 3)"
            )
            raise Closed(msg)
        self.device, self.client_id = device, client_id
        server._per_device[device.id] += 1
        if client_id:
            old = server._by_client_id.get(client_id)
            if old is not None:
                logger.info(
                    "mqtt_server: client id %r connected again; the old one is closed", client_id
                )
                old.writer.close()
            server._by_client_id[client_id] = self
        self._connack(ACCEPTED, assigned_id=not client_id)
        logger.info(
            "mqtt_server: %s%s connected (client id %r, keepalive %ds)",
            "gateway " if device.gateway is not None else "",
            device.id,
            client_id,
            connect.keepalive,
        )
        return connect.keepalive * KEEPALIVE_FACTOR

    async def _serve(self, keepalive: float) -> None:
        watchdog = Keepalive(keepalive) if keepalive else None
        try:
            await self._read_packets(watchdog)
        finally:
            if watchdog is not None:
                watchdog.stop()

    async def _read_packets(self, watchdog: Keepalive | None) -> None:
        while not self.stopping:
            if watchdog is not None:
                watchdog.reading()
            try:
                kind, flags, body = await read_packet(self.reader, self.max_packet)
            except asyncio.CancelledError:
                if watchdog is None or not watchdog.fired:
                    raise
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
                self.server.keepalive_timeouts += 1
                msg = f"nothing received for {watchdog.seconds:g}s (1.5 x keepalive)"
                raise Closed(msg) from None
            if watchdog is not None:
                watchdog.idle()  # time spent keeping the message is not the device's silence
            if kind == PUBLISH:
                await self._publish(flags, body)
            elif kind == PINGREQ:
                self._send(b"\xd0\x00")
            elif kind == SUBSCRIBE:
                self._subscribe(body)
            elif kind == UNSUBSCRIBE:
                self._unsubscribe(body)
            elif kind == DISCONNECT:
                return
            else:
                msg = f"unexpected packet type {kind}"
                raise Closed(msg)

    # -- packets --------------------------------------------------------------------------

    def _connack(self, code: int, *, assigned_id: bool = False) -> None:
        server = self.server
        self._send(
            connack(
                code,
                v5=self.v5,
                receive_max=server.max_inflight,
                max_packet=self.max_packet,
                assigned_id=f"edgesieve-{id(self):x}" if assigned_id else None,
            )
        )

    def _send(self, packet: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(packet)

    def _publish_to_device(self, topic: str, payload: dict[str, object]) -> None:
        """PUBLISH QoS 0 to the device (an RPC or attribute request's answer)."""
        self._send(publish_qos0(topic, json.dumps(payload).encode(), v5=self.v5))

    def _unsubscribe(self, body: bytes) -> None:
        self._send(unsuback(body, v5=self.v5))

    def _subscribe(self, body: bytes) -> None:
        assert self.device is not None
        codes = bytearray()
        for topic, qos in subscription_filters(body, v5=self.v5):
            codes.append(granted_qos(self.device, topic, qos))
            if codes[-1] == REFUSED:
                logger.info("mqtt_server: %s: subscription to %r refused", self._id, topic)
        self._send(suback(body, bytes(codes), v5=self.v5))

    # -- PUBLISH --------------------------------------------------------------------------

    @property
    def _id(self) -> str:
        return self.device.id if self.device is not None else "?"

    async def _publish(self, flags: int, body: bytes) -> None:
        qos = (flags >> 1) & 0x03
        if qos == 3:
            msg = "PUBLISH with QoS 3 (malformed)"
            raise Closed(msg)
        if qos == 2:
            msg = "PUBLISH with QoS 2, which the edge does not serve; publish with QoS 0 or 1"
            raise Closed(msg)
        topic, at = read_string(body, 0)
        packet_id = None
        if qos:
            (packet_id,) = struct.unpack_from("!H", body, at)
            at += 2
        at = skip_properties(body, at, v5=self.v5)
        payload = body[at:]
        if len(payload) > self.server._ingress.max_payload_bytes:
            msg = (
                f"payload of {len(payload)} bytes on {topic!r} is over the "
                f"{self.server._ingress.max_payload_bytes}-byte limit; split it"
            )
            raise Closed(msg)
        await self._wait_until_admitted()
        await self.slots.acquire()  # at most max_inflight wait: the next read waits here
        task = asyncio.create_task(self._handle(topic, payload, packet_id, dup=bool(flags & 0x08)))
        self.pending.put_nowait(task)

    async def _wait_until_admitted(self) -> None:
        """Stop reading while the journal pushes back for this device (TCP backpressure)."""
        delay = _RETRY_MIN_S
        while self.server._ingress.busy(self._id) is not None:
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX_S)

    async def _ack_in_order(self) -> None:
        """PUBACK each message once kept, in arrival order; the writer's buffer paces reading."""
        while True:
            task = await self.pending.get()
            if task is None:
                return
            try:
                packet_id = await task
                self.slots.release()
                if packet_id is not None:
                    self._send(puback(packet_id))
                await self.writer.drain()
            except ConnectionError:
                return
            except Exception:
                logger.exception(
                    "mqtt_server: %s: a message failed; closing the connection", self._id
                )
                self.writer.close()
                return

    async def _handle(
        self, topic: str, payload: bytes, packet_id: int | None, *, dup: bool
    ) -> int | None:
        """Keep the message (journal commit or an RPC answer); ``packet_id`` once it is kept.

        A PUBLISH with DUP set (sent again after a lost PUBACK) is stored once
        when the journal already holds it.
        """
        device = self.device
        assert device is not None
        channel = TOPIC_CHANNELS.get(topic)
        if channel is not None:
            await self._keep(device.id, channel, TRANSPORT, payload, dup)
        elif topic.startswith(RPC_REQUEST):
            self._rpc(topic.removeprefix(RPC_REQUEST), payload)
        elif topic.startswith(ATTRIBUTES_REQUEST):
            self._publish_to_device(
                ATTRIBUTES_RESPONSE + topic.removeprefix(ATTRIBUTES_REQUEST), {}
            )
        elif topic.startswith(RPC_RESPONSE):
            logger.debug("mqtt_server: %s answered an RPC the edge did not send", device.id)
        elif topic.startswith(GATEWAY):
            await self._gateway(topic.removeprefix(GATEWAY), payload, dup)
        else:
            reason = f"topic {topic[:100]!r} is not part of the ThingsBoard device API; {API_HINT}"
            await self._keep(device.id, refused_channel(reason), TRANSPORT, payload)
        return packet_id

    async def _keep(
        self, device: str, channel: str, transport: str, payload: bytes, dup: bool = False
    ) -> None:
        """Journal one message, retrying while the journal refuses it; return after the commit."""
        ingress = self.server._ingress
        delay = _RETRY_MIN_S
        while True:
            offer = await ingress.deliver(device, channel, transport, payload, redelivery=dup)
            if offer.verdict is Verdict.OVERLOADED:
                logger.debug("mqtt_server: %s: %s; retrying", device, offer.reason)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            if offer.verdict is Verdict.TOO_LARGE:  # a gateway's part, re-encoded: keep it dead
                reason = f"{channel}: {offer.reason}"
                cut = payload[: ingress.max_payload_bytes]
                await self._keep(device, refused_channel(reason), transport, cut)
            return

    def _rpc(self, request_id: str, payload: bytes) -> None:
        assert self.device is not None
        answer = rpc_answer(
            self.device,
            payload,
            max_payload_bytes=self.server._ingress.max_payload_bytes,
            max_inflight=self.server.max_inflight,
        )
        self._publish_to_device(RPC_RESPONSE + request_id, answer)

    async def _gateway(self, what: str, payload: bytes, dup: bool) -> None:
        device = self.device
        assert device is not None
        if device.gateway is None:
            reason = (
                f"device {device.id!r} is not a gateway but published to v1/gateway/{what[:40]}; "
                "hint: give it `gateway: {devices: [...]}` in devices.yaml, or " + API_HINT
            )
            await self._keep(device.id, refused_channel(reason), TRANSPORT, payload)
            return
        routed = route(device, what, payload, dup=dup)
        if routed.event is not None:
            logger.info("mqtt_server: %s", routed.event)
        await asyncio.gather(*(self._keep(*part) for part in routed.parts))


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no CONNECT within {CONNECT_TIMEOUT_S:g}s"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "closed before CONNECT"
    return str(exc) or type(exc).__name__
