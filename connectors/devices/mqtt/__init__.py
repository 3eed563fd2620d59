"""The MQTT device transport: client settings and set-up (the ingest client is in ``journaled``)."""

from connectors.devices.mqtt.client import MqttSettings, check_settings, connect_client

__all__ = ["MqttSettings", "check_settings", "connect_client"]
