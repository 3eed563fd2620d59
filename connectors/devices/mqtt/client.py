"""MQTT client settings and set-up shared by the ingest client and the alarm publisher.

:class:`MqttSettings` (broker URL, credentials, protocol, session, keepalive)
is checked once when it is made; :func:`connect_client` builds a
paho-mqtt 2.x client from it with its session and reconnect backoff.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

__all__ = ["MqttSettings", "check_settings", "connect_client"]

_PROTOCOLS = {"3.1.1": MQTTProtocolVersion.MQTTv311, "5": MQTTProtocolVersion.MQTTv5}
_DEFAULT_PORT = 1883


_NUMBER_HINTS = {
    "session_expiry_s": "seconds the broker keeps the session while the edge is down",
    "keepalive_s": "seconds between MQTT pings, e.g. 30",
    "reconnect_min_s": "first reconnect delay in seconds, e.g. 0.2",
    "reconnect_max_s": "longest reconnect delay; at least reconnect_min_s",
}


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _settings_error(field: str, got: object, expected: str, hint: str) -> ValueError:
    return ValueError(f"MqttSettings.{field}: {expected}, got {got!r}; hint: {hint}")


@dataclass(frozen=True)
class MqttSettings:
    """Connection settings of :class:`~connectors.devices.mqtt.journaled.JournaledMqtt`.

    :class:`~connectors.sinks.mqtt.MqttSink` uses them too, except ``channels``
    and the session settings (it publishes on a clean session).

    ``url`` is ``mqtt://host:port`` (port 1883 when left out). Devices publish
    on ``v1/devices/{device_id}/{channel}`` for each of ``channels``.
    ``persistent`` keeps the broker-side session (``clean_session=False`` in
    MQTT 3.1.1, ``clean_start=False`` with ``session_expiry_s`` in MQTT 5), so
    QoS 1 messages published while the edge is down are delivered when it
    comes back with the same ``client_id``.
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
    def _check_name(field: str, value: object) -> None:
        if not isinstance(value, str) or not value:
            raise _settings_error(
                field, value, f"{field} must be a non-empty string", "e.g. 'edgesieve'"
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

    def topics(self) -> list[str]:
        """Topic filters to subscribe, one per channel."""
        return [f"v1/devices/+/{channel}" for channel in self.channels]

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
