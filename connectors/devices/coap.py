"""CoAP device server on aiocoap, run by :class:`~connectors.devices.ingress.DeviceServers`.

Devices ``POST`` to ``coap://HOST:PORT/api/v1/{token}/telemetry`` (JSON) and
``.../api/v1/{token}/vibration`` (EVB1 blocks, block-wise when larger than a
datagram), confirmable or not. One path-capable resource serves the whole
device API, so tokens are never enumerated as resources; the token is checked
against the :class:`~connectors.devices.registry.DeviceRegistry` on every request
(and every block) and never logged.

Response codes:

====================================  =======================================================
2.04 Changed                          accepted and queued for the flow (committed to the
                                      journal, with one)
2.31 Continue                         block received, send the next one (Block1)
4.00 Bad Request                      malformed payload (one-line reason as diagnostic
                                      payload; queued as a dead letter), empty payload,
                                      or Block1 blocks of the wrong size
4.01 Unauthorized                     unknown access token
4.04 Not Found                        not ``/api/v1/{token}/telemetry|vibration``
4.05 Method Not Allowed               anything but POST on the device API
4.08 Request Entity Incomplete        a later block without the earlier ones, or after its
                                      transfer expired
4.13 Request Entity Too Large         body over ``ingress.max_payload_bytes`` (Size1 = limit)
5.03 Service Unavailable              the ingress queue or journal, the device's share of the
                                      journal, or the block-wise spool (all of it, or the
                                      device's own part) is full; Max-Age =
                                      ``ingress.retry_after_s``
====================================  =======================================================

Block-wise uploads (RFC 7959 Block1) are reassembled here rather than by
aiocoap's generic spool, which has no size limit and keeps each completed
body for 93 s or more after the last block: a transfer is refused with 4.13 as soon as a
block (or the client's Size1 option) goes past the payload limit, at most
``max_transfers`` transfers are held at once and at most
``max_device_transfers`` of them for one device (5.03 beyond either, with a
reason saying which), and a transfer is dropped when no block came for
``transfer_timeout_s`` or, however steadily its blocks come,
``transfer_deadline_s`` after its first block (a later block gets 4.08). So
one device can hold neither the whole spool nor a slot for ever, and the
spool never holds more than ``max_transfers × max_payload_bytes`` bytes;
nothing is spooled for an unknown token (every block is authenticated).

With a journal (``Ingress(journal=...)``) the answer to a request (or to its
last block) waits for the journal's commit: 2.04, and 4.00 for a malformed
payload (journaled as a dead letter), are sent only once the message is on
disk; a journal that refuses it gives 5.03 with the journal's reason. A
commit normally takes milliseconds, well inside the piggy-backed ACK. When one
takes longer, aiocoap (0.4.17, ``messagemanager._process_request``) sends an
empty ACK for a confirmable request by itself once ``EMPTY_ACK_DELAY`` (0.1 s)
has passed without a response, and the 2.04 then follows as a separate
confirmable response (RFC 7252 §5.2.2), retransmitted until the device
acknowledges it: the device never retransmits a request whose commit is
merely slow. A non-confirmable request gets a non-confirmable answer whenever
the commit is done.
"""

from __future__ import annotations

import errno
import logging
import re
import socket
import time
from dataclasses import dataclass

import aiocoap
from aiocoap.message import Message
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption
from aiocoap.resource import PathCapable, Resource

from connectors.codecs.attributes_json import ATTRIBUTES
from connectors.common.address import parse_host_port
from connectors.devices.ingress import Ingress, Verdict
from connectors.devices.registry import DeviceRegistry
from operators.records import LOGS, TELEMETRY, VIBRATION

__all__ = ["WIRE_LOGGER", "CoapServer"]

logger = logging.getLogger("edgesieve.coap")

WIRE_LOGGER = "edgesieve.coap.wire"
"""aiocoap's own logger for the server; set to WARNING unless configured otherwise."""

TRANSPORT = "coap"
CHANNELS = (TELEMETRY, VIBRATION, ATTRIBUTES, LOGS)
DEFAULT_MAX_TRANSFERS = 16
DEFAULT_MAX_DEVICE_TRANSFERS = 2
DEFAULT_TRANSFER_TIMEOUT_S = 93.0
"""RFC 7252's MAX_TRANSMIT_WAIT: the longest a client may take between blocks."""
DEFAULT_TRANSFER_DEADLINE_S = 300.0
"""The longest a whole block-wise upload may take, from its first block."""

_MAX_DIAGNOSTIC_BYTES = 512
_BERT_EXPONENT = 7
_API_PATHS = (
    "POST to /api/v1/{token}/telemetry, /api/v1/{token}/attributes, /api/v1/{token}/logs "
    "or /api/v1/{token}/vibration"
)
_REDACT = re.compile(r"(api/v1/|'api', 'v1', ')[^/'\"\s]+")


def _diagnostic(text: str) -> bytes:
    """A diagnostic payload: UTF-8, one line, short enough for one datagram."""
    data = " ".join(text.split()).encode()
    if len(data) <= _MAX_DIAGNOSTIC_BYTES:
        return data
    return data[: _MAX_DIAGNOSTIC_BYTES - 3].decode(errors="ignore").encode() + b"..."


def _reply(code: Code, reason: str = "") -> Message:
    return Message(code=code, payload=_diagnostic(reason) if reason else b"")


class _RedactTokens(logging.Filter):
    """Replace the token in anything that looks like a device API path."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        redacted = _REDACT.sub(r"\1***", text)
        if redacted != text:
            record.msg = redacted
            record.args = None
        return True


def _quiet_wire_logger() -> None:
    wire = logging.getLogger(WIRE_LOGGER)
    if wire.level == logging.NOTSET:
        wire.setLevel(logging.WARNING)
    if not any(isinstance(f, _RedactTokens) for f in wire.filters):
        wire.addFilter(_RedactTokens())


@dataclass(slots=True)
class _Transfer:
    """One block-wise upload in progress."""

    device: str
    channel: str
    body: bytearray
    touched: float
    deadline: float
    """Monotonic time past which the transfer is dropped, set at its first block."""


_TransferKey = tuple[object, str, str, tuple[bytes, ...]]
"""Which blocks belong together: the client endpoint, device, channel and Request-Tag."""


class _DeviceApi(Resource, PathCapable):
    """The whole device API as one resource: ``/api/v1/{token}/{channel}``."""

    def __init__(
        self,
        registry: DeviceRegistry,
        ingress: Ingress,
        *,
        max_transfers: int,
        max_device_transfers: int,
        transfer_timeout_s: float,
        transfer_deadline_s: float,
    ) -> None:
        super().__init__()
        self._registry = registry
        self._ingress = ingress
        self._max_transfers = max_transfers
        self._max_device_transfers = max_device_transfers
        self._transfer_timeout_s = transfer_timeout_s
        self._transfer_deadline_s = transfer_deadline_s
        self._transfers: dict[_TransferKey, _Transfer] = {}

    def get_link_description(self) -> None:
        """Keep the device API out of ``/.well-known/core``."""
        return None

    async def needs_blockwise_assembly(self, request: Message) -> bool:
        """Block1 is reassembled by :meth:`handle`, with limits."""
        return False

    async def render(self, request: Message) -> Message:
        """Answer one request (or one block of a request)."""
        return await self.handle(request)

    @property
    def pending_transfers(self) -> int:
        return len(self._transfers)

    def clear(self) -> None:
        self._transfers.clear()

    async def handle(self, request: Message) -> Message:
        path = request.opt.uri_path
        if len(path) != 4 or path[:2] != ("api", "v1") or not path[2] or path[3] not in CHANNELS:
            return _reply(Code.NOT_FOUND, f"no such resource; devices {_API_PATHS}")
        token, channel = path[2], path[3]
        if request.code != Code.POST:
            reason = f"method {request.code.name} is not allowed; devices {_API_PATHS}"
            return _reply(Code.METHOD_NOT_ALLOWED, reason)
        device = self._registry.authenticate(token)
        if device is None:
            logger.info(
                "coap: unknown access token on %s from %s", channel, request.remote.hostinfo
            )
            reason = "unknown access token; check the token in the URI path against devices.yaml"
            return _reply(Code.UNAUTHORIZED, reason)
        block1 = request.opt.block1
        if block1 is None:
            payload = request.payload
        else:
            assembled = self._assemble(request, device, channel, block1)
            if isinstance(assembled, Message):
                return assembled
            payload = assembled
        response = await self._offer(device, channel, payload, request)
        if block1 is not None:
            response.opt.block1 = BlockOption.BlockwiseTuple(
                block1.block_number, False, block1.size_exponent
            )
        return response

    async def _offer(self, device: str, channel: str, payload: bytes, request: Message) -> Message:
        ingress = self._ingress
        size1 = request.opt.size1
        limit = ingress.max_payload_bytes
        if size1 is not None and size1 > limit:
            return self._too_large(channel, size1, "announced (Size1)")
        if not payload:
            reason = (
                f"{channel}: payload is empty; POST a JSON document, log lines or an EVB1 block"
            )
            return _reply(Code.BAD_REQUEST, reason)
        # A confirmable request whose answer was lost (the edge crashed after the commit) is
        # sent again with the same message id and token: the journal keeps it once.
        key = f"{request.remote.hostinfo}|{request.mid}|{request.token.hex()}".encode()
        offer = await ingress.deliver(device, channel, TRANSPORT, payload, dedup_key=key)
        verdict = offer.verdict
        logger.debug("coap: %s from %s: %s", channel, device, verdict.value)
        if verdict is Verdict.ACCEPTED:
            return Message(code=Code.CHANGED)
        if verdict is Verdict.REJECTED:
            return _reply(Code.BAD_REQUEST, offer.reason)
        if verdict is Verdict.TOO_LARGE:
            response = _reply(Code.REQUEST_ENTITY_TOO_LARGE, offer.reason)
            response.opt.size1 = limit
            return response
        return self._busy(offer.reason)

    def _busy(self, reason: str) -> Message:
        response = _reply(Code.SERVICE_UNAVAILABLE, reason)
        response.opt.max_age = self._ingress.retry_after_s
        return response

    def _refuse(self, reason: str) -> Message:
        """:meth:`_busy` for a block-wise upload refused at its first block, counted."""
        self._ingress.refused += 1
        return self._busy(reason)

    def _too_large(self, channel: str, size: int, what: str) -> Message:
        limit = self._ingress.max_payload_bytes
        reason = (
            f"{channel}: body of {size} bytes {what} is over the {limit}-byte limit; "
            "split it into smaller messages"
        )
        response = _reply(Code.REQUEST_ENTITY_TOO_LARGE, reason)
        response.opt.size1 = limit
        return response

    def _assemble(
        self,
        request: Message,
        device: str,
        channel: str,
        block1: BlockOption.BlockwiseTuple,
    ) -> bytes | Message:
        """Spool one Block1 block: the whole body once complete, else the response to send."""
        key: _TransferKey = (
            request.remote.blockwise_key,
            device,
            channel,
            tuple(request.opt.request_tag),
        )
        number, more, exponent = block1.block_number, block1.more, block1.size_exponent
        payload = request.payload
        if exponent == _BERT_EXPONENT:
            self._transfers.pop(key, None)
            reason = (
                f"{channel}: Block1 size exponent 7 (BERT) is only defined for CoAP over TCP; "
                "use blocks of 16 to 1024 bytes"
            )
            return _reply(Code.BAD_REQUEST, reason)
        if len(payload) > block1.size or (more and len(payload) != block1.size):
            self._transfers.pop(key, None)
            reason = (
                f"{channel}: block {number} carries {len(payload)} bytes but Block1 announces "
                f"{block1.size}-byte blocks; every block but the last must be full"
            )
            return _reply(Code.BAD_REQUEST, reason)
        size1 = request.opt.size1
        limit = self._ingress.max_payload_bytes
        if size1 is not None and size1 > limit:
            self._transfers.pop(key, None)
            return self._too_large(channel, size1, "announced (Size1)")
        end = block1.start + len(payload)
        if end > limit:
            self._transfers.pop(key, None)
            return self._too_large(channel, end, f"reached at block {number}")
        now = time.monotonic()
        if number == 0:
            self._transfers.pop(key, None)
            if not more:
                return payload
            self._expire(now)
            retry = self._ingress.retry_after_s
            if len(self._transfers) >= self._max_transfers:
                reason = (
                    f"edge is busy: {len(self._transfers)} block-wise uploads in progress, "
                    f"the most it holds; retry in {retry}s"
                )
                return self._refuse(reason)
            mine = sum(1 for t in self._transfers.values() if t.device == device)
            if mine >= self._max_device_transfers:
                reason = (
                    f"{channel}: device {device} has {mine} block-wise uploads in progress, "
                    f"the most one device may hold (transports.coap.max_device_transfers); "
                    f"finish one or let it expire, retry in {retry}s"
                )
                return self._refuse(reason)
            busy = self._ingress.busy(device)
            if busy is not None:
                return self._refuse(busy)
            deadline = now + self._transfer_deadline_s
            self._transfers[key] = _Transfer(device, channel, bytearray(payload), now, deadline)
            return self._continue(block1)
        transfer = self._transfers.get(key)
        if transfer is not None and now > transfer.deadline:
            del self._transfers[key]
            reason = (
                f"{channel}: block {number} arrived after the {self._transfer_deadline_s:g}s "
                "a block-wise upload may take from its first block "
                "(transports.coap.transfer_deadline); restart from block 0 with larger blocks "
                "or a smaller body"
            )
            return _reply(Code.REQUEST_ENTITY_INCOMPLETE, reason)
        if transfer is None or now - transfer.touched > self._transfer_timeout_s:
            self._transfers.pop(key, None)
            reason = (
                f"{channel}: block {number} arrived without the earlier blocks of its transfer "
                "(or after it timed out); restart from block 0"
            )
            return _reply(Code.REQUEST_ENTITY_INCOMPLETE, reason)
        if block1.start != len(transfer.body):
            del self._transfers[key]
            reason = (
                f"{channel}: block {number} starts at byte {block1.start} but "
                f"{len(transfer.body)} bytes have arrived; restart from block 0"
            )
            return _reply(Code.REQUEST_ENTITY_INCOMPLETE, reason)
        transfer.body += payload
        transfer.touched = now
        if more:
            return self._continue(block1)
        del self._transfers[key]
        return bytes(transfer.body)

    @staticmethod
    def _continue(block1: BlockOption.BlockwiseTuple) -> Message:
        response = Message(code=Code.CONTINUE)
        response.opt.block1 = BlockOption.BlockwiseTuple(
            block1.block_number, True, block1.size_exponent
        )
        return response

    def _expire(self, now: float) -> None:
        timeout = self._transfer_timeout_s
        expired = [
            k for k, t in self._transfers.items() if now - t.touched > timeout or now > t.deadline
        ]
        for key in expired:
            del self._transfers[key]


class CoapServer:
    """The CoAP device API server; a :class:`~connectors.devices.ingress.DeviceServer`.

    ``listen`` is ``"HOST:PORT"`` (``"[::1]:5683"`` for IPv6); port 0 picks
    a free UDP port, readable from :attr:`port` once started. Each request is
    authenticated with ``registry`` and offered to ``ingress`` on the event
    loop thread. ``max_transfers``, ``max_device_transfers``,
    ``transfer_timeout_s`` and ``transfer_deadline_s`` bound the block-wise
    uploads held at once (see the module docstring).
    """

    name = "coap"

    def __init__(
        self,
        listen: str,
        registry: DeviceRegistry,
        ingress: Ingress,
        *,
        max_transfers: int = DEFAULT_MAX_TRANSFERS,
        max_device_transfers: int = DEFAULT_MAX_DEVICE_TRANSFERS,
        transfer_timeout_s: float = DEFAULT_TRANSFER_TIMEOUT_S,
        transfer_deadline_s: float = DEFAULT_TRANSFER_DEADLINE_S,
    ) -> None:
        self.host, self._requested_port = parse_host_port(listen, key="CoapServer.listen")
        self.listen = listen
        for name, value, hint in (
            ("max_transfers", max_transfers, "block-wise uploads held at once, e.g. 16"),
            ("max_device_transfers", max_device_transfers, "uploads of one device, e.g. 2"),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"CoapServer: {name} must be an int >= 1; got {value!r}; hint: {hint}"
                raise ValueError(msg)
        if max_device_transfers > max_transfers:
            msg = (
                f"CoapServer: max_device_transfers must be <= max_transfers ({max_transfers}); "
                f"got {max_device_transfers}; hint: one device's share of the uploads held"
            )
            raise ValueError(msg)
        for name, value, hint in (
            ("transfer_timeout_s", transfer_timeout_s, "seconds a client may pause between blocks"),
            ("transfer_deadline_s", transfer_deadline_s, "seconds a whole upload may take"),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                msg = f"CoapServer: {name} must be a number > 0; got {value!r}; hint: {hint}"
                raise ValueError(msg)
        self.registry = registry
        self.ingress = ingress
        self._api = _DeviceApi(
            registry,
            ingress,
            max_transfers=max_transfers,
            max_device_transfers=max_device_transfers,
            transfer_timeout_s=float(transfer_timeout_s),
            transfer_deadline_s=float(transfer_deadline_s),
        )
        self._context: aiocoap.Context | None = None
        self._port = self._requested_port

    @property
    def port(self) -> int:
        """The UDP port served (the chosen one once started, if ``listen`` said 0)."""
        return self._port

    @property
    def running(self) -> bool:
        """Whether the server is bound and answering."""
        return self._context is not None

    @property
    def pending_transfers(self) -> int:
        """Block-wise uploads currently held in the spool."""
        return self._api.pending_transfers

    async def start(self) -> None:
        """Bind the UDP socket and start answering; raise a clear OSError if the port is taken."""
        if self._context is not None:
            msg = f"CoapServer on {self.listen}: already started; hint: call stop() first"
            raise RuntimeError(msg)
        _quiet_wire_logger()
        family, address = self._resolve()
        port = self._reserve(family, address)
        try:
            context = await aiocoap.Context.create_server_context(
                self._api,
                bind=(address, port),
                loggername=WIRE_LOGGER,
                transports=["udp6"],
            )
        except OSError as exc:
            raise self._bind_error(exc, port) from None
        self._context = context
        self._port = port
        logger.info("coap: device API listening on udp %s port %d", address, port)

    async def stop(self) -> None:
        """Stop answering and release the port; block-wise uploads in progress are dropped."""
        context, self._context = self._context, None
        if context is None:
            return
        self._api.clear()
        await context.shutdown()
        logger.info("coap: device API on port %d stopped", self._port)

    def _resolve(self) -> tuple[socket.AddressFamily, str]:
        try:
            infos = socket.getaddrinfo(
                self.host, None, type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICSERV
            )
        except socket.gaierror as exc:
            msg = (
                f"CoapServer: cannot resolve host {self.host!r} of listen {self.listen!r} "
                f"({exc.strerror}); hint: use an IP address such as 127.0.0.1 or [::1]"
            )
            raise OSError(errno.EADDRNOTAVAIL, msg) from None
        family, _, _, _, sockaddr = infos[0]
        return family, str(sockaddr[0])

    def _reserve(self, family: socket.AddressFamily, address: str) -> int:
        """Check that the port is free (aiocoap binds with SO_REUSEPORT, which would share it)."""
        port = self._requested_port
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((address, port))
            except OSError as exc:
                raise self._bind_error(exc, port) from None
            return int(probe.getsockname()[1])

    def _bind_error(self, exc: OSError, port: int) -> OSError:
        if exc.errno == errno.EADDRINUSE:
            msg = (
                f"CoapServer: cannot listen on udp {self.host} port {port} "
                f"(listen {self.listen!r}): the port is already in use; hint: stop the other "
                "CoAP server or pick another port in transports.coap.listen "
                "(port 0 picks a free one)"
            )
        else:
            msg = (
                f"CoapServer: cannot listen on udp {self.host} port {port} "
                f"(listen {self.listen!r}): {exc.strerror or exc}; hint: use an address of this "
                "machine, e.g. 127.0.0.1 or [::1]"
            )
        return OSError(exc.errno, msg)
