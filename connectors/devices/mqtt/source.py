"""MQTT transport: a Bytewax :class:`~bytewax.inputs.DynamicSource` over paho-mqtt 2.x.

Each worker runs one paho client with its network loop in its own thread.
Messages on ``v1/devices/{device}/{channel}`` become
:class:`~operators.records.RawMessage` records and are handed to the dataflow
through a bounded buffer. QoS 1 messages are acknowledged only once they are
in that buffer; when the buffer is full the paho thread waits, so the broker
stops sending (its in-flight window fills up) and keeps the rest queued.

With several workers, each one joins the shared subscription
``$share/{share_group}/v1/devices/+/{channel}`` so every message goes to
exactly one worker.

"""

from __future__ import annotations

import logging
import threading
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as paho
from bytewax.inputs import DynamicSource, StatelessSourcePartition
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from connectors.devices.mqtt.client import MqttSettings, check_settings, connect_client
from operators.records import RawMessage

__all__ = ["MqttSource", "MqttSourcePartition"]

logger = logging.getLogger("edgesieve.mqtt")

_IDLE_AWAKE = timedelta(milliseconds=5)
_FULL_WAIT_S = 0.05


class MqttSourcePartition(StatelessSourcePartition[RawMessage]):
    """One worker's MQTT client and its bounded hand-off buffer.

    Counters for tests and metrics: ``received`` (messages put in the buffer),
    ``ignored`` (messages on topics outside the device API), ``high_water``
    (largest buffer length seen, never above ``buffer_messages``), ``connects``
    and ``connect_failures``.
    """

    def __init__(
        self,
        settings: MqttSettings,
        stop: threading.Event,
        *,
        client_id: str,
        topics: list[str],
    ) -> None:
        self._settings = settings
        self._stop = stop
        self._client_id = client_id
        self._topics = [(topic, settings.qos) for topic in topics]
        self._channels = frozenset(settings.channels)
        self._bound = settings.buffer_messages
        self._max_batch = settings.max_batch
        self._linger = timedelta(seconds=settings.linger_s)
        self._buf: deque[RawMessage] = deque()
        self._cond = threading.Condition()
        self._waiting = False
        self._busy = False
        self._closed = False
        self._state = "new"
        self.received = 0
        self.ignored = 0
        self.high_water = 0
        self.connects = 0
        self.connect_failures = 0
        self._subscribed = False
        self._client = self._make_client()
        self._client.loop_start()

    def _make_client(self) -> paho.Client:
        s = self._settings
        client = connect_client(s, self._client_id, persistent=s.persistent, manual_ack=True)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._set_state("connecting", logging.INFO, "connecting to %s:%d", s.host, s.port)
        return client

    @property
    def buffered(self) -> int:
        """Messages waiting in the hand-off buffer."""
        return len(self._buf)

    @property
    def connected(self) -> bool:
        """Whether the client is connected to the broker right now."""
        return self._state == "connected"

    @property
    def ready(self) -> bool:
        """Whether the client is connected and the broker acknowledged its subscriptions."""
        return self._subscribed and self._state == "connected"

    @property
    def client_id(self) -> str:
        """MQTT client id of this worker."""
        return self._client_id

    def _set_state(self, state: str, level: int, fmt: str, *args: Any) -> None:
        if state != self._state:
            self._state = state
            logger.log(level, "mqtt client %s: " + fmt, self._client_id, *args)
        else:
            logger.debug("mqtt client %s: " + fmt, self._client_id, *args)

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        s = self._settings
        if reason.is_failure:
            self.connect_failures += 1
            self._set_state(
                f"refused:{reason}",
                logging.ERROR,
                "broker %s:%d refused the connection (%s, user %r); retrying with backoff",
                s.host,
                s.port,
                reason,
                s.username,
            )
            return
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
        s = self._settings
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
        if self._closed:
            self._set_state("closed", logging.INFO, "disconnected")
        elif self._state == "connected":
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
        refused = False
        for (topic, _qos), reason in zip(self._topics, reasons, strict=False):
            if reason.is_failure:
                refused = True
                logger.error(
                    "mqtt client %s: broker refused subscription %r (%s); check the broker ACL",
                    self._client_id,
                    topic,
                    reason,
                )
            else:
                logger.debug("mqtt client %s: subscribed %r (%s)", self._client_id, topic, reason)
        self._subscribed = not refused

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        # ``_busy`` brackets the stop check and the append, so that next_batch
        # can tell that no message is about to land in an empty buffer.
        self._busy = True
        try:
            if self._stop.is_set() or self._closed:
                return
            try:
                parts = msg.topic.split("/")
            except UnicodeDecodeError:
                parts = []
            if (
                len(parts) != 4
                or parts[0] != "v1"
                or parts[1] != "devices"
                or not parts[2]
                or parts[3] not in self._channels
            ):
                self.ignored += 1
                client.ack(msg.mid, msg.qos)
                return
            buf = self._buf
            if len(buf) >= self._bound and not self._wait_for_room():
                return
            buf.append(RawMessage(parts[2], parts[3], "mqtt", datetime.now(UTC), msg.payload))
            size = len(buf)
            if size > self.high_water:
                self.high_water = size
            self.received += 1
            client.ack(msg.mid, msg.qos)
        finally:
            self._busy = False

    def _wait_for_room(self) -> bool:
        """Block the paho thread until the buffer has room; False when stopping."""
        buf, bound, stop = self._buf, self._bound, self._stop
        with self._cond:
            self._waiting = True
            try:
                while len(buf) >= bound:
                    if stop.is_set() or self._closed:
                        return False
                    self._cond.wait(_FULL_WAIT_S)
            finally:
                self._waiting = False
        return True

    def next_batch(self) -> list[RawMessage]:
        """Return up to ``max_batch`` buffered messages without blocking.

        Messages are handed over once ``max_batch`` are buffered or the oldest
        has waited ``linger_s`` (or at stop): fuller batches cost the dataflow
        far less per message than a trickle of tiny ones.

        :raises StopIteration: once the stop event is set and the buffer is empty.
        """
        buf = self._buf
        size = len(buf)
        if size:
            if (
                size < self._max_batch
                and datetime.now(UTC) - buf[0].received_at < self._linger
                and not self._stop.is_set()
            ):
                return []
            popleft = buf.popleft
            batch = [popleft() for _ in range(min(size, self._max_batch))]
            if self._waiting:
                with self._cond:
                    self._cond.notify()
            return batch
        if self._stop.is_set() and not self._busy and not buf:
            raise StopIteration
        return []

    def next_awake(self) -> datetime | None:
        """Poll when a batch is due: full, lingered long enough, or in about 5 ms when idle."""
        buf = self._buf
        if not buf:
            return datetime.now(UTC) + _IDLE_AWAKE
        if len(buf) >= self._max_batch:
            return None
        try:
            return buf[0].received_at + self._linger
        except IndexError:
            return None

    def close(self) -> None:
        """Disconnect cleanly and stop the network thread."""
        if self._closed:
            return
        self._closed = True
        with self._cond:
            self._cond.notify_all()
        self._client.disconnect()
        self._client.loop_stop()
        self._set_state("closed", logging.INFO, "closed")


class MqttSource(DynamicSource[RawMessage]):
    """Device messages from an MQTT broker, one client per worker.

    Setting ``stop`` (or calling :meth:`request_stop`) makes every worker stop
    taking messages, hand over what it buffered and end its input, so windows
    close and sinks flush downstream. Messages that arrive after that are not
    acknowledged; a persistent session keeps them at the broker.
    """

    def __init__(self, settings: MqttSettings, *, stop: threading.Event | None = None) -> None:
        self.settings = check_settings("MqttSource", settings)
        self.stop = stop if stop is not None else threading.Event()
        self._partitions: list[MqttSourcePartition] = []
        self._lock = threading.Lock()

    def build(self, step_id: str, worker_index: int, worker_count: int) -> MqttSourcePartition:
        """Connect this worker's client (shared subscription when ``worker_count > 1``)."""
        shared = worker_count > 1
        client_id = (
            f"{self.settings.client_id}-{worker_index}" if shared else self.settings.client_id
        )
        topics = self.settings.topics(shared=shared)
        part = MqttSourcePartition(self.settings, self.stop, client_id=client_id, topics=topics)
        with self._lock:
            self._partitions.append(part)
        return part

    def request_stop(self) -> None:
        """Ask every worker to drain its buffer and end the input."""
        self.stop.set()

    @property
    def partitions(self) -> list[MqttSourcePartition]:
        """Partitions built so far (one per worker)."""
        with self._lock:
            return list(self._partitions)

    @property
    def ready(self) -> bool:
        """Whether every worker is connected and subscribed."""
        parts = self.partitions
        return bool(parts) and all(p.ready for p in parts)

    @property
    def received(self) -> int:
        """Messages handed to the dataflow buffer, over all workers."""
        return sum(p.received for p in self.partitions)

    @property
    def ignored(self) -> int:
        """Messages on topics outside the device API, over all workers."""
        return sum(p.ignored for p in self.partitions)

    @property
    def high_water(self) -> int:
        """Largest hand-off buffer length seen by any worker."""
        return max((p.high_water for p in self.partitions), default=0)

    @property
    def connects(self) -> int:
        """Successful connections over all workers."""
        return sum(p.connects for p in self.partitions)

    @property
    def connect_failures(self) -> int:
        """Failed or refused connection attempts over all workers."""
        return sum(p.connect_failures for p in self.partitions)
