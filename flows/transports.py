"""The configured transports as one stream of device messages."""

from __future__ import annotations

import threading

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream

from connectors.devices.ingress import DeviceServer, DeviceServers, Ingress
from connectors.devices.mqtt import MqttSettings, MqttSource
from connectors.devices.registry import DeviceRegistry
from flows.config import ConfigError, EdgeConfig
from operators.records import RawMessage

__all__ = ["device_inputs", "mqtt_settings"]


def mqtt_settings(
    config: EdgeConfig, *, channels: tuple[str, ...], role: str = "ingest"
) -> MqttSettings:
    """Client settings from ``transports.mqtt``.

    The client id is ``{client_id}-{channels}`` (``-{role}`` for publishers), so
    flows sharing one broker never take each other's session.
    """
    section = config.transports.mqtt
    if section is None:
        msg = (
            "transports.mqtt: not configured, so the flow has no MQTT input; "
            'hint: add transports: {mqtt: {url: "mqtt://127.0.0.1:1883"}} to the config'
        )
        raise ConfigError(msg)
    base = section.client_id or f"edgesieve-{config.edge_id}"
    client_id = f"{base}-{'-'.join(channels)}"
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
        buffer_messages=section.buffer_messages,
    )


def device_inputs(
    step_id: str,
    flow: Dataflow,
    config: EdgeConfig,
    *,
    channels: tuple[str, ...],
    stop: threading.Event,
) -> tuple[Stream[RawMessage], list[MqttSource | DeviceServers]]:
    """One stream of device messages from every configured transport, and the sources.

    MQTT subscribes to ``channels``; the HTTP and CoAP servers (which need the
    device registry) serve every channel of the device API. Each source's
    ``ready`` says when it is subscribed or listening.
    """
    transports = config.transports
    streams: list[Stream[RawMessage]] = []
    sources: list[MqttSource | DeviceServers] = []
    if transports.mqtt is not None:
        source = MqttSource(mqtt_settings(config, channels=channels), stop=stop)
        sources.append(source)
        streams.append(op.input(f"{step_id}_mqtt", flow, source))
    servers: list[DeviceServer] = []
    if transports.http is not None or transports.coap is not None:
        assert config.devices is not None  # checked when the config was loaded
        registry = DeviceRegistry.load(config.devices)
        ingress = Ingress(
            max_messages=transports.queue_messages, max_payload_bytes=config.max_payload_bytes
        )
        if transports.http is not None:
            from connectors.devices.http import HttpServer

            servers.append(HttpServer(transports.http.listen, registry, ingress))
        if transports.coap is not None:
            from connectors.devices.coap import CoapServer

            servers.append(CoapServer(transports.coap.listen, registry, ingress))
        servers_source = DeviceServers(ingress, servers, stop=stop)
        sources.append(servers_source)
        streams.append(op.input(f"{step_id}_servers", flow, servers_source))
    if not streams:
        msg = (
            "transports: none is configured, so the flow has no input; "
            "hint: add transports.mqtt, transports.http or transports.coap to the config"
        )
        raise ConfigError(msg)
    if len(streams) == 1:
        return streams[0], sources
    return op.merge(f"{step_id}_transports", *streams), sources
