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

:class:`MqttSettings` and :func:`connect_client` (protocol, credentials,
session and reconnect backoff of a paho client) are shared with the alarm
publisher, :class:`~connectors.sinks.mqtt.MqttSink`.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from bytewax.inputs import DynamicSource, StatelessSourcePartition
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from operators.records import RawMessage

__all__ = [
    "MqttSettings",
    "MqttSource",
    "MqttSourcePartition",
    "check_settings",
    "connect_client",
]

logger = logging.getLogger("edgesieve.mqtt")

_PROTOCOLS = {"3.1.1": MQTTProtocolVersion.MQTTv311, "5": MQTTProtocolVersion.MQTTv5}
_WILDCARDS = ("/", "+", "#")
_IDLE_AWAKE = timedelta(milliseconds=5)
_FULL_WAIT_S = 0.05
_DEFAULT_PORT = 1883


_NUMBER_HINTS = {
    "session_expiry_s": "seconds the broker keeps the session while the edge is down",
    "keepalive_s": "seconds between MQTT pings, e.g. 30",
    "reconnect_min_s": "first reconnect delay in seconds, e.g. 0.2",
    "reconnect_max_s": "longest reconnect delay; at least reconnect_min_s",
    "buffer_messages": "messages held between the client and the dataflow, e.g. 10000",
    "max_batch": "messages per next_batch, e.g. 1000",
    "linger_s": "seconds a message may wait for a fuller batch, e.g. 0.02",
}


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _settings_error(field: str, got: object, expected: str, hint: str) -> ValueError:
    return ValueError(f"MqttSettings.{field}: {expected}, got {got!r}; hint: {hint}")


@dataclass(frozen=True)
class MqttSettings:
    """Connection and flow-control settings of :class:`MqttSource`.

    :class:`~connectors.sinks.mqtt.MqttSink` uses the connection part of the
    same settings (``url``, ``qos``, ``client_id``, credentials, ``protocol``,
    ``keepalive_s`` and the reconnect delays).

    ``url`` is ``mqtt://host:port`` (port 1883 when left out). Devices publish
    on ``v1/devices/{device_id}/{channel}`` for each of ``channels``.
    ``persistent`` keeps the broker-side session (``clean_session=False`` in
    MQTT 3.1.1, ``clean_start=False`` with ``session_expiry_s`` in MQTT 5), so
    QoS 1 messages published while the edge is down are delivered when it
    comes back with the same ``client_id``. ``buffer_messages`` bounds the
    hand-off buffer between the paho thread and the dataflow; ``max_batch``
    bounds one :meth:`MqttSourcePartition.next_batch`, and ``linger_s`` is how long
    a message may wait for a fuller batch.
    """

    url: str = "mqtt://127.0.0.1:1883"
    qos: int = 1
    channels: tuple[str, ...] = ("telemetry",)
    client_id: str = "edgesieve"
    username: str | None = None
    password: str | None = None
    protocol: str = "3.1.1"
    persistent: bool = True
    session_expiry_s: int = 86_400
    keepalive_s: int = 30
    reconnect_min_s: float = 0.2
    reconnect_max_s: float = 30.0
    buffer_messages: int = 10_000
    max_batch: int = 1_000
    linger_s: float = 0.02
    share_group: str = "edgesieve"

    def __post_init__(self) -> None:
        self._check_url()
        if isinstance(self.qos, bool) or self.qos not in (0, 1):
            raise _settings_error(
                "qos", self.qos, "QoS must be 0 or 1", "use 1 (at least once) unless loss is fine"
            )
        if self.protocol not in _PROTOCOLS:
            raise _settings_error(
                "protocol",
                self.protocol,
                "protocol must be '3.1.1' or '5'",
                "write the MQTT version as a string, e.g. protocol='5'",
            )
        self._check_channels()
        self._check_name("client_id", self.client_id)
        self._check_name("share_group", self.share_group, no_wildcards=True)
        if self.username is not None and not isinstance(self.username, str):
            raise _settings_error(
                "username",
                self.username,
                "username must be a string",
                "on the device API the username is the device id",
            )
        if self.username == "":
            raise _settings_error(
                "username",
                self.username,
                "username must not be empty",
                "leave it None for anonymous access",
            )
        if self.password is not None and self.username is None:
            msg = (
                "MqttSettings.password: a password was given without a username; "
                "hint: set username too (on the device API the username is the device id)"
            )
            raise ValueError(msg)
        self._check_number("session_expiry_s", self.session_expiry_s, 0, 0xFFFF_FFFF, int)
        self._check_number("keepalive_s", self.keepalive_s, 1, 65_535, int)
        self._check_number("reconnect_min_s", self.reconnect_min_s, 0.001, 3_600.0, float)
        self._check_number(
            "reconnect_max_s", self.reconnect_max_s, self.reconnect_min_s, 86_400.0, float
        )
        self._check_number("buffer_messages", self.buffer_messages, 1, 10_000_000, int)
        self._check_number("max_batch", self.max_batch, 1, 10_000_000, int)
        self._check_number("linger_s", self.linger_s, 0.0, 10.0, float)

    def _check_url(self) -> None:
        if not isinstance(self.url, str):
            raise _settings_error("url", self.url, "url must be a string", "'mqtt://HOST:PORT'")
        parts = urlsplit(self.url)
        if parts.scheme != "mqtt":
            hint = (
                "TLS (mqtts://) is not supported yet; use mqtt://HOST:PORT"
                if parts.scheme in ("mqtts", "ssl", "tls")
                else "write it as mqtt://HOST:PORT, e.g. mqtt://127.0.0.1:1883"
            )
            raise _settings_error("url", self.url, "url scheme must be 'mqtt'", hint)
        if parts.username is not None or parts.password is not None:
            msg = (
                "MqttSettings.url: credentials in the URL are not accepted, "
                f"got a URL with a user part for host {parts.hostname!r}; "
                "hint: pass username= and password= instead"
            )
            raise ValueError(msg)
        if not parts.hostname:
            raise _settings_error(
                "url", self.url, "url has no host", "write it as mqtt://HOST:PORT"
            )
        try:
            port = parts.port
        except ValueError:
            port = -1
        if port is not None and not 1 <= port <= 65_535:
            raise _settings_error(
                "url",
                self.url,
                "url port must be a number in 1..65535",
                "leave the port out for the default 1883",
            )
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise _settings_error(
                "url",
                self.url,
                "url must not have a path, query or fragment",
                "topics come from channels=, not from the URL",
            )

    def _check_channels(self) -> None:
        channels = self.channels
        if isinstance(channels, str) or not isinstance(channels, tuple | list):
            raise _settings_error(
                "channels",
                channels,
                "channels must be a tuple of channel names",
                "channels=('telemetry', 'vibration')",
            )
        if not channels:
            raise _settings_error(
                "channels", channels, "channels must not be empty", "channels=('telemetry',)"
            )
        for channel in channels:
            if not isinstance(channel, str) or not channel or any(c in channel for c in "/+#"):
                raise _settings_error(
                    "channels",
                    channels,
                    f"channel {channel!r} must be a non-empty name without '/', '+' or '#'",
                    "channels are the last topic level, e.g. 'telemetry'",
                )
        object.__setattr__(self, "channels", tuple(dict.fromkeys(channels)))

    @staticmethod
    def _check_name(field: str, value: object, *, no_wildcards: bool = False) -> None:
        if not isinstance(value, str) or not value:
            raise _settings_error(
                field, value, f"{field} must be a non-empty string", "e.g. 'edgesieve'"
            )
        if no_wildcards and any(c in value for c in _WILDCARDS):
            raise _settings_error(
                field, value, f"{field} must not contain '/', '+' or '#'", "use e.g. 'edgesieve'"
            )

    @staticmethod
    def _check_number(field: str, value: object, low: float, high: float, kind: type) -> None:
        ok_type = (int,) if kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok_type) or not low <= value <= high:
            what = "an integer" if kind is int else "a number"
            bounds = f"{_number(low)}..{_number(high)}"
            raise _settings_error(
                field, value, f"{field} must be {what} in {bounds}", _NUMBER_HINTS[field]
            )

    @property
    def host(self) -> str:
        """Broker host taken from ``url``."""
        return str(urlsplit(self.url).hostname)

    @property
    def port(self) -> int:
        """Broker port taken from ``url`` (1883 when left out)."""
        return urlsplit(self.url).port or _DEFAULT_PORT

    def topics(self, *, shared: bool) -> list[str]:
        """Topic filters to subscribe, one per channel (shared ones with ``shared``)."""
        prefix = f"$share/{self.share_group}/" if shared else ""
        return [f"{prefix}v1/devices/+/{channel}" for channel in self.channels]

    def __repr__(self) -> str:
        password = None if self.password is None else "***"
        return (
            f"MqttSettings(url={self.url!r}, qos={self.qos}, channels={self.channels!r}, "
            f"client_id={self.client_id!r}, username={self.username!r}, password={password!r}, "
            f"protocol={self.protocol!r}, persistent={self.persistent})"
        )


def check_settings(owner: str, settings: object) -> MqttSettings:
    """Return ``settings`` if it is :class:`MqttSettings`; raise for ``owner`` otherwise."""
    if not isinstance(settings, MqttSettings):
        msg = (
            f"{owner}: settings must be MqttSettings, got {type(settings).__name__}; "
            f"hint: {owner}(MqttSettings(url='mqtt://127.0.0.1:1883'), ...)"
        )
        raise TypeError(msg)
    return settings


def connect_client(
    settings: MqttSettings,
    client_id: str,
    *,
    persistent: bool,
    manual_ack: bool = False,
    max_queued: int = 0,
) -> paho.Client:
    """A paho client for ``settings`` with its connection set up but not started.

    Protocol, credentials, reconnect backoff, keepalive and the session
    (``persistent`` keeps it at the broker: ``clean_session=False`` in MQTT
    3.1.1, ``clean_start=False`` with ``session_expiry_s`` in MQTT 5) come
    from ``settings``; the URL was checked there (plain ``mqtt://`` only, no
    credentials in it). ``max_queued`` bounds the outgoing messages held
    while disconnected (``0``: no bound). Set the callbacks, then call
    ``loop_start()``: the network thread connects and reconnects with backoff.
    """
    protocol = _PROTOCOLS[settings.protocol]
    v5 = protocol == MQTTProtocolVersion.MQTTv5
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=None if v5 else not persistent,
        protocol=protocol,
        manual_ack=manual_ack,
    )
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    client.reconnect_delay_set(settings.reconnect_min_s, settings.reconnect_max_s)  # type: ignore[arg-type]
    client.max_queued_messages_set(max_queued)
    properties = None
    if v5:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = settings.session_expiry_s if persistent else 0
    client.connect_async(
        settings.host,
        settings.port,
        keepalive=settings.keepalive_s,
        clean_start=not persistent,
        properties=properties,
    )
    return client


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
