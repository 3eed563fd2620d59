"""The MQTT device transport: client settings and set-up, and the Bytewax source."""

from connectors.devices.mqtt.client import MqttSettings, check_settings, connect_client
from connectors.devices.mqtt.source import MqttSource, MqttSourcePartition

__all__ = ["MqttSettings", "MqttSource", "MqttSourcePartition", "check_settings", "connect_client"]
