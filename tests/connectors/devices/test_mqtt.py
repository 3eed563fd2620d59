"""MqttSettings: the broker connection of the ingest client and the alarm publisher, checked."""

from __future__ import annotations

from typing import Any

import pytest

from connectors.devices.mqtt import MqttSettings


def test_settings_defaults_and_url_parts() -> None:
    cfg = MqttSettings()
    assert (cfg.host, cfg.port, cfg.qos, cfg.protocol) == ("127.0.0.1", 1883, 1, "3.1.1")
    assert MqttSettings(url="mqtt://broker.local").port == 1883
    assert MqttSettings(url="mqtt://[::1]:1999").host == "::1"
    assert MqttSettings(channels=["telemetry", "telemetry"]).channels == ("telemetry",)  # type: ignore[arg-type]
    assert cfg.topics() == ["v1/devices/+/telemetry"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"url": "http://127.0.0.1:1883"}, r"url scheme must be 'mqtt', got 'http://.*hint: write"),
        ({"url": "mqtts://127.0.0.1:8883"}, r"scheme must be 'mqtt'.*TLS \(mqtts://\) is not"),
        ({"url": "127.0.0.1:1883"}, r"url scheme must be 'mqtt'"),
        ({"url": 1883}, r"MqttSettings.url: url must be a string, got 1883"),
        ({"url": "mqtt://:1883"}, r"url has no host, got 'mqtt://:1883'"),
        ({"url": "mqtt://h:0"}, r"port must be a number in 1..65535, got 'mqtt://h:0'"),
        ({"url": "mqtt://h:70000"}, r"port must be a number in 1..65535"),
        ({"url": "mqtt://h:abc"}, r"port must be a number in 1..65535"),
        ({"url": "mqtt://u:pw@h:1883"}, r"credentials in the URL are not accepted.*username="),
        ({"url": "mqtt://h:1883/topic"}, r"must not have a path, query or fragment"),
        ({"qos": 2}, r"MqttSettings.qos: QoS must be 0 or 1, got 2; hint"),
        ({"qos": True}, r"QoS must be 0 or 1, got True"),
        ({"protocol": "3.1"}, r"protocol must be '3.1.1' or '5', got '3.1'; hint"),
        ({"protocol": 5}, r"protocol must be '3.1.1' or '5', got 5; hint: write the MQTT"),
        ({"channels": "telemetry"}, r"channels must be a tuple of channel names, got 'telem"),
        ({"channels": ()}, r"channels must not be empty"),
        ({"channels": ("v1/x",)}, r"channel 'v1/x' must be a non-empty name without '/'"),
        ({"channels": ("#",)}, r"channel '#' must be a non-empty name"),
        ({"client_id": ""}, r"client_id must be a non-empty string, got ''"),
        ({"username": ""}, r"username must not be empty.*None for anonymous"),
        ({"username": 7}, r"username must be a string, got 7"),
        ({"password": "pw"}, r"password was given without a username"),
        ({"session_expiry_s": -1}, r"session_expiry_s must be an integer in 0..4294967295"),
        ({"keepalive_s": 0}, r"keepalive_s must be an integer in 1..65535, got 0; hint: seconds"),
        ({"reconnect_min_s": 0}, r"reconnect_min_s must be a number in 0.001..3600, got 0"),
        ({"reconnect_max_s": 0.1}, r"reconnect_max_s must be a number in 0.2..86400, got 0.1"),
    ],
)
def test_settings_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MqttSettings(**kwargs)
