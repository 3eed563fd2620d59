"""The configured device transports: MQTT client settings, and the check that one exists."""

from __future__ import annotations

from connectors.devices.mqtt import MqttSettings
from flows.config import ConfigError, EdgeConfig

__all__ = ["mqtt_settings", "require_transports"]

_UNNAMED = frozenset({"attributes", "logs"})
"""Channels left out of the MQTT client id when the flow takes others too."""


def mqtt_settings(
    config: EdgeConfig, *, channels: tuple[str, ...], role: str = "ingest"
) -> MqttSettings:
    """Client settings from ``transports.mqtt``.

    The client id is ``{client_id}-{channels}`` (``-{role}`` for publishers), so
    flows sharing one broker never take each other's session. ``attributes``
    and ``logs`` are not named in it beside other channels: a flow that takes
    them too keeps the session its data channels had, with the messages the
    broker queued for it.
    """
    section = config.transports.mqtt
    if section is None:
        msg = (
            "transports.mqtt: not configured, so the flow has no MQTT input; "
            'hint: add transports: {mqtt: {url: "mqtt://127.0.0.1:1883"}} to the config'
        )
        raise ConfigError(msg)
    base = section.client_id or f"edgesieve-{config.edge_id}"
    named = [channel for channel in channels if channel not in _UNNAMED] or list(channels)
    client_id = f"{base}-{'-'.join(named)}"
    if role != "ingest":
        client_id = f"{client_id}-{role}"
    return MqttSettings(
        url=section.url,
        qos=section.qos,
        channels=channels,
        client_id=client_id,
        username=section.username,
        password=section.password,
        protocol=section.protocol,
        persistent=section.persistent,
        keepalive_s=section.keepalive,
    )


def require_transports(config: EdgeConfig) -> None:
    """Refuse a config without any device transport: the flow would have no input."""
    transports = config.transports
    if not any((transports.mqtt, transports.http, transports.coap, transports.mqtt_server)):
        msg = (
            "transports: none is configured, so the flow has no input; "
            "hint: add transports.mqtt, transports.http, transports.coap or transports.mqtt_server "
            "to the config"
        )
        raise ConfigError(msg)
