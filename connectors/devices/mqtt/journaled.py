"""MQTT device messages written to the ingest journal, each acknowledged after its commit.

:class:`JournaledMqtt` runs one paho client (network loop in its own thread)
with manual acknowledgements and a persistent session (MQTT 3.1.1
``clean_session=False``; MQTT 5 ``clean_start=False`` with a session expiry),
subscribed to ``v1/devices/+/{channel}``. Every message is submitted to the
:class:`~connectors.devices.journal.Journal` (``redelivery`` = the DUP flag, so
a message the broker sends again after a lost PUBACK is stored once). The
journal calls back once per group commit, on its writer thread, with the
group's messages in submission order (:meth:`Journal.append_received`); their
PUBACKs are then queued to paho as one write (one wake-up of its network loop,
one ``send()``), in arrival order, and only for the connection they came in on.
Per message the network thread does little: a remembered topic lookup, one
tuple, one journal lock.

When the journal refuses (over ``journal.max_bytes``, disk full, queue full:
``admit()`` gives a reason or the callback gets ``JournalFull``) the
message is not acknowledged. It waits in a bounded retry list (arrival order)
and is submitted again once ``admit()`` says there is room; meanwhile every
newer message joins the list behind it. The broker does not resend an
unacknowledged message before a reconnect, so nothing is lost, and as the
unacknowledged messages fill its in-flight window (MQTT 5 Receive Maximum,
mosquitto's ``max_inflight_messages`` for 3.1.1 clients) it stops sending and
queues the rest in the session. If the list is full anyway, the message is
dropped from memory unacknowledged and, once the list has drained, the
connection is dropped on purpose so the broker redelivers it.

A device over its share of the journal (``journal.device_share``) is not
pushed back here as an HTTP or CoAP device is: the broker told it "accepted"
already (its own PUBACK), and a PUBACK withheld for one device stops every
device on the session (PUBACKs go in arrival order, and unacknowledged
messages fill the broker's in-flight window for the whole session). Its
messages are submitted with ``over_share=True``: journaled, processed and
acknowledged like any other while the journal has room beyond one device's
share, which stays kept for the devices within theirs (HTTP, CoAP and the
other MQTT devices alike); counted in the journal's ``over_share``. Only
past that reserve is it withheld as above. Marking such messages as dead
letters instead would keep the same bytes (a dead letter keeps its payload)
and only make valid data look bad.

An acknowledgement is only sent on the connection the message came in on: a
message packet id is only meaningful there. A message committed while the
client was reconnecting is redelivered by the broker with DUP set and then
acknowledged as a duplicate without being written again.

QoS: the subscription asks for ``settings.qos`` (1; ``transports.mqtt.qos``
allows only 0 and 1, so QoS 2 is refused at config time, and a device's QoS 2
publish is downgraded to 1 by the broker). With QoS 0 nothing is acknowledged:
messages are journaled as received, and one lost between the broker and the
edge (or refused by a full journal while it was in memory only) is gone.
"""

from __future__ import annotations

import bisect
import logging
import socket
import threading
import time
from typing import Any, Final, NamedTuple

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from connectors.devices.journal import Committed, Journal, JournalFull
from connectors.devices.mqtt.client import MqttSettings, check_settings, connect_client
from connectors.devices.mqtt.ingest_client import IngestClient

__all__ = ["DEFAULT_RECEIVE_MAXIMUM", "JournaledMqtt", "device_topic"]

logger = logging.getLogger("edgesieve.mqtt.journaled")

DEFAULT_RECEIVE_MAXIMUM: Final = 1000
"""Unacknowledged QoS 1 messages the broker may send at once (MQTT 5 Receive Maximum)."""
RETRY_INTERVAL_S: Final = 0.05
"""How often withheld messages are offered to the journal again."""
_CLOSE_TIMEOUT_S: Final = 10.0
_ROUTES_MAX: Final = 65_536
"""Topics whose (device, channel) is remembered (the memo is cleared beyond this)."""


def device_topic(topic: str, channels: frozenset[str]) -> tuple[str, str] | None:
    """``(device, channel)`` of ``v1/devices/{device}/{channel}``; None for any other topic."""
    parts = topic.split("/")
    if (
        len(parts) != 4
        or parts[0] != "v1"
        or parts[1] != "devices"
        or not parts[2]
        or parts[3] not in channels
    ):
        return None
    return parts[2], parts[3]


class _Pending(NamedTuple):
    """One received message until it is committed (and acknowledged); ordered by ``seq``."""

    seq: int
    device: str
    channel: str
    received_us: int
    payload: bytes
    mid: int
    qos: int
    dup: bool
    connection: int


class JournaledMqtt:
    """A paho client whose device messages are acknowledged once the journal committed them.

    ``receive_maximum`` is sent as MQTT 5 Receive Maximum (mosquitto applies
    its ``max_inflight_messages`` to 3.1.1 clients instead) and ``max_withheld``
    bounds the retry list (default: twice ``receive_maximum``). Counters:
    ``received``, ``committed``, ``duplicates``, ``acked``, ``withheld`` (times
    a message went to the retry list), ``dropped`` (retry list full),
    ``ignored`` (topics outside the device API), ``connects``,
    ``connect_failures``.
    """

    def __init__(
        self,
        settings: MqttSettings,
        journal: Journal,
        *,
        receive_maximum: int = DEFAULT_RECEIVE_MAXIMUM,
        max_withheld: int | None = None,
    ) -> None:
        self.settings = check_settings("JournaledMqtt", settings)
        if isinstance(receive_maximum, bool) or not 1 <= receive_maximum <= 65_535:
            msg = (
                f"JournaledMqtt: receive_maximum must be an integer in 1..65535, got "
                f"{receive_maximum!r}; hint: unacknowledged messages in flight, e.g. 1000"
            )
            raise ValueError(msg)
        withheld_bound = 2 * receive_maximum if max_withheld is None else max_withheld
        if isinstance(withheld_bound, bool) or withheld_bound < 1:
            msg = (
                f"JournaledMqtt: max_withheld must be an integer >= 1, got {max_withheld!r}; "
                "hint: leave it unset (twice receive_maximum)"
            )
            raise ValueError(msg)
        self.journal = journal
        self.receive_maximum = receive_maximum
        self.max_withheld = withheld_bound
        self._channels = frozenset(settings.channels)
        self._routes: dict[str, tuple[str, str] | None] = {}
        """(device, channel) of each topic seen (network thread; cleared beyond _ROUTES_MAX)."""
        self._topics = [(topic, settings.qos) for topic in settings.topics()]
        self._lock = threading.RLock()
        self._withheld: list[_Pending] = []
        self._resync = False
        self._withholding = False
        self._seq = 0
        self._connection = 0
        self._state = "new"
        self._subscribed = False
        self._taking = True
        self._closed = False
        self._wake = threading.Event()
        self.received = 0
        self.committed = 0
        self.duplicates = 0
        self.acked = 0
        self.withheld = 0
        self.dropped = 0
        self.ignored = 0
        self.connects = 0
        self.connect_failures = 0
        self._client: IngestClient = self._make_client()
        self._retrier = threading.Thread(
            target=self._retry_loop, name="edgesieve-mqtt-withheld", daemon=True
        )

    def _make_client(self) -> IngestClient:
        s = self.settings
        client = connect_client(s, s.client_id, persistent=s.persistent, manual_ack=True)
        client.__class__ = IngestClient  # connect_client's paho.Client, PUBACKs batched
        client._acks = []
        client.busy = self._journal_busy
        if s.protocol == "5":
            # connect_client's CONNECT properties, plus Receive Maximum
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = s.session_expiry_s if s.persistent else 0
            properties.ReceiveMaximum = self.receive_maximum
            client.connect_async(
                s.host,
                s.port,
                keepalive=s.keepalive_s,
                clean_start=not s.persistent,
                properties=properties,
            )
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the network loop (it connects, and reconnects with backoff) and the retrier."""
        s = self.settings
        self._set_state("connecting", logging.INFO, "connecting to %s:%d", s.host, s.port)
        self._client.loop_start()
        self._retrier.start()

    @property
    def ready(self) -> bool:
        """Whether the client is connected and the broker granted its subscriptions."""
        return self._subscribed and self._state == "connected"

    @property
    def client_id(self) -> str:
        """The MQTT client id (its session at the broker)."""
        return self.settings.client_id

    @property
    def withheld_now(self) -> int:
        """Messages in the retry list, waiting for room in the journal."""
        return len(self._withheld)

    def stop_taking(self) -> None:
        """Take no more messages: later ones stay unacknowledged in the broker's session."""
        with self._lock:
            self._taking = False
        self._wake.set()

    def close(self) -> None:
        """Disconnect after the acknowledgements queued so far; stop the threads.

        Close the journal first (it commits what was submitted and its callbacks
        queue the PUBACKs), then this: the DISCONNECT goes out after them.
        Withheld messages are left unacknowledged for the broker to redeliver.
        """
        if self._closed:
            return
        self.stop_taking()
        self._closed = True
        self._wake.set()
        if self._retrier.is_alive():
            self._retrier.join(_CLOSE_TIMEOUT_S)
        self._client.disconnect()
        self._client.loop_stop()
        self._set_state("closed", logging.INFO, "closed (%d withheld)", len(self._withheld))

    # -- paho callbacks (network thread) ------------------------------------------------------

    def _set_state(self, state: str, level: int, fmt: str, *args: Any) -> None:
        if state != self._state:
            self._state = state
            logger.log(level, "mqtt client %s: " + fmt, self.client_id, *args)
        else:
            logger.debug("mqtt client %s: " + fmt, self.client_id, *args)

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        s = self.settings
        if reason.is_failure:
            self.connect_failures += 1
            self._set_state(
                f"refused:{reason}",
                logging.ERROR,
                "broker %s:%d refused the connection (%s, user %r); hint: check "
                "transports.mqtt.username/password against the broker; retrying with backoff",
                s.host,
                s.port,
                reason,
                s.username,
            )
            return
        with self._lock:
            self._connection += 1
        self.connects += 1
        self._subscribed = False
        self._set_state(
            "connected",
            logging.INFO,
            "connected to %s:%d (session present: %s)",
            s.host,
            s.port,
            flags.session_present,
        )
        client.subscribe(self._topics)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        s = self.settings
        self.connect_failures += 1
        self._set_state(
            "unreachable",
            logging.WARNING,
            "broker %s:%d unreachable; retrying with backoff (up to %gs)",
            s.host,
            s.port,
            s.reconnect_max_s,
        )

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._subscribed = False
        if not self._closed and self._state == "connected":
            self._set_state(
                "disconnected", logging.WARNING, "connection lost (%s); reconnecting", reason
            )

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        refused = [
            topic
            for (topic, _), reason in zip(self._topics, reasons, strict=False)
            if reason.is_failure
        ]
        for topic in refused:
            logger.error(
                "mqtt client %s: broker refused subscription %r; hint: check the broker ACL "
                "for user %r",
                self.client_id,
                topic,
                self.settings.username,
            )
        self._subscribed = not refused

    def _journal_busy(self) -> bool:
        """Whether a full group waits for the journal writer (network thread, before a read)."""
        return self.journal.queued >= self.journal.settings.max_batch

    def _route(self, topic: str) -> tuple[str, str] | None:
        """(device, channel) of ``topic``, remembered."""
        routes = self._routes
        if len(routes) >= _ROUTES_MAX:
            routes.clear()
        where = routes[topic] = device_topic(topic, self._channels)
        return where

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            where = None
        else:
            where = self._routes.get(topic, False)
            if where is False:
                where = self._route(topic)
        if where is None:
            self.ignored += 1
            paho.Client.ack(client, msg.mid, msg.qos)  # at once, not in a journal group
            return
        with self._lock:
            if not self._taking:
                return  # unacknowledged: the broker keeps it in the session
            self._seq += 1
            self.received += 1
            pending = _Pending(
                self._seq,
                where[0],  # type: ignore[index]
                where[1],  # type: ignore[index]
                time.time_ns() // 1000,
                msg.payload,
                msg.mid,
                msg.qos,
                bool(msg.dup),
                self._connection,
            )
            if self._withheld or self.journal.admit() is not None:
                self._withhold(pending)
            else:
                self._submit(pending)

    # -- journal ------------------------------------------------------------------------------

    def _submit(self, pending: _Pending) -> bool:
        """Submit ``pending``; False when the journal refused it at once (it is withheld again)."""
        return self.journal.append_received(
            pending.device,
            pending.channel,
            "mqtt",
            pending.received_us,
            pending.payload,
            self._committed,
            pending,
            redelivery=pending.dup,
            over_share=True,
        )

    def _committed(self, group: list[_Pending], outcomes: list[Committed | BaseException]) -> None:
        """The commits' callback (journal writer thread, submission order): PUBACKs at once."""
        connection = self._connection
        acks: list[_Pending] = []
        for pending, outcome in zip(group, outcomes, strict=True):
            if outcome.__class__ is Committed:
                if outcome.duplicate:  # type: ignore[union-attr]
                    self.duplicates += 1
                else:
                    self.committed += 1
                # QoS 0 has no ack; a packet id of an older connection means nothing now
                if pending.qos and pending.connection == connection:
                    acks.append(pending)
            elif isinstance(outcome, JournalFull):
                with self._lock:
                    self._withhold(pending, str(outcome))
            else:
                logger.warning(
                    "mqtt client %s: message from %s not journaled (%s); left unacknowledged "
                    "for the broker to redeliver",
                    self.client_id,
                    pending.device,
                    outcome,
                )
        if acks:
            self._ack(acks)

    def _ack(self, group: list[_Pending]) -> None:
        """Send the PUBACKs of ``group`` (committed, in arrival order) as one write."""
        client = self._client
        for pending in group:
            client.ack(pending.mid, pending.qos)
        client.send_acks()
        self.acked += len(group)

    def _withhold(self, pending: _Pending, reason: str | None = None) -> None:
        """Keep ``pending`` for a later submission, in arrival order (lock held)."""
        if len(self._withheld) >= self.max_withheld:
            self.dropped += 1
            self._resync = True
            logger.warning(
                "mqtt client %s: %d messages wait for room in the journal, the most held; "
                "a message from %s is left to the broker, which redelivers it after a reconnect",
                self.client_id,
                len(self._withheld),
                pending.device,
            )
            return
        if not self._withholding:
            self._withholding = True
            logger.warning(
                "mqtt client %s: the journal refuses messages (%s); withholding PUBACKs",
                self.client_id,
                reason or self.journal.admit() or "journal full",
            )
        bisect.insort(self._withheld, pending)
        self.withheld += 1
        self._wake.set()

    def _retry_loop(self) -> None:
        while not self._closed:
            self._wake.wait(RETRY_INTERVAL_S)
            self._wake.clear()
            if self._closed:
                return
            with self._lock:
                if not self._withheld or not self._taking:
                    continue
                if self.journal.admit(self._withheld[0].device, over_share=True) is not None:
                    continue
                waiting, self._withheld = self._withheld, []
                for i, pending in enumerate(waiting):
                    if not self._submit(pending):  # withheld again by _committed
                        for rest in waiting[i + 1 :]:
                            bisect.insort(self._withheld, rest)
                        break
                drained = not self._withheld
                if not drained:  # refused again: wait RETRY_INTERVAL_S rather than spin
                    self._wake.clear()
                resync = drained and self._resync
                if resync:
                    self._resync = False
                ended = drained and self._withholding
                if ended:
                    self._withholding = False
            if ended:
                logger.info(
                    "mqtt client %s: the journal has room again; withheld messages submitted",
                    self.client_id,
                )
            if resync:
                self._reconnect()

    def _reconnect(self) -> None:
        """Drop the connection so the broker redelivers what was dropped from the retry list."""
        sock = self._client.socket()
        if sock is None:
            return
        logger.info(
            "mqtt client %s: reconnecting to get dropped messages redelivered", self.client_id
        )
        try:
            sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
        except OSError:
            pass
